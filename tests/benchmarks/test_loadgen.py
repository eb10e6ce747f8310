"""The load generator against the real engine process, with both protocols."""

import json
import subprocess
import sys

import pytest

from benchmarks.common import engine_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_url(default_model_dir):
    flags = ["--model-id", str(default_model_dir), "--max-input-tokens", "256",
             "--max-total-tokens", "512"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


def bench(tmp_path, *args: str) -> tuple[int, dict]:
    """`ray-tgi bench ARGS` as a user runs it; (exit code, JSON report)."""
    ray_tgi = f"{sys.prefix}/bin/ray-tgi"
    out = tmp_path / "report.json"
    done = subprocess.run([ray_tgi, "bench", *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert out.is_file(), done.stderr
    return done.returncode, json.loads(out.read_text())


@pytest.mark.parametrize("protocol", ["tgi", "openai"])
def test_closed_loop_measures_every_token(engine_url, tmp_path, protocol):
    plot = tmp_path / "plot.png"
    args = ["--url", engine_url, "--protocol", protocol, "--concurrency", "3", "--num-requests",
            "6", "--input-len", "uniform:8:64", "--output-len", "fixed:12"]  # fmt: skip
    code, report = bench(tmp_path, *args, "--plot", str(plot))
    summary = report["summary"]
    assert code == 0 and summary["num_errors"] == 0 and summary["num_requests"] == 6
    for req in report["requests"]:
        assert 1 <= len(req["token_times"]) <= 12
        assert req["start"] < req["token_times"][0] <= req["token_times"][-1] <= req["end"]
    assert summary["num_output_tokens"] == sum(len(r["token_times"]) for r in report["requests"])
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    assert summary["output_tok_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_arrivals_and_errors_are_counted(engine_url, tmp_path):
    # Prompts over --max-input-tokens 256 are refused with 422: every request is an error.
    code, report = bench(tmp_path, "--url", engine_url, "--rate", "20", "--num-requests", "4",
                         "--input-len", "fixed:300", "--output-len", "fixed:4")  # fmt: skip
    assert code == 1
    assert report["summary"]["num_errors"] == 4
    assert "HTTP 422" in report["summary"]["first_errors"][0]
    starts = [r["start"] for r in report["requests"]]
    assert starts == sorted(starts) and starts[-1] > starts[0]  # Poisson gaps, not all at once
