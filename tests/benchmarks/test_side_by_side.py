"""The side-by-side benchmarks: (a) end to end on a tiny workload, both sides in one report;
(b) gives each side prompts of its own; (c) passes the engine's launcher flags on."""

import json

import pytest

from benchmarks import engine_vs_hf, serve_vs_direct, vs_llamacpp
from benchmarks.loadgen import RequestResult
from benchmarks.serve_vs_direct import paired_ttft_added_ms, set_dotted, tagged
from benchmarks.workload import BenchRequest

pytestmark = pytest.mark.slow


def test_engine_vs_hf_reports_both_sides_and_their_ratio(tmp_path, default_model_dir):
    argv = ["--model-id", str(default_model_dir), "--concurrency", "2", "--num-requests", "4",
            "--input-len", "uniform:8:32", "--output-len", "fixed:6",
            "--results-dir", str(tmp_path)]  # fmt: skip
    assert engine_vs_hf.main(argv) == 0
    report = json.loads((tmp_path / "engine_vs_hf.json").read_text())
    engine, hf = report["summaries"]["engine"], report["summaries"]["hf_static"]
    assert engine["num_errors"] == hf["num_errors"] == 0
    # Greedy on the same weights: both sides generate the same number of tokens.
    assert 4 <= engine["num_output_tokens"] == hf["num_output_tokens"] <= 24
    assert report["ratios"]["output_tok_s"] == pytest.approx(
        engine["output_tok_s"] / hf["output_tok_s"], rel=1e-3
    )
    assert report["machine"]["num_cpus"] >= 1 and report["command"].startswith("python -m")
    assert (tmp_path / "engine_vs_hf.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_vs_direct_gives_each_side_its_own_prompts():
    # The engine's prefix cache would hand the side that runs second the first side's KV.
    requests = [BenchRequest("same prompt", 2, 4), BenchRequest("same prompt", 2, 4)]
    direct, serve = tagged(requests, "c1d"), tagged(requests, "c1s")
    prompts = [r.prompt for r in direct + serve]
    assert len(set(prompts)) == 4
    assert all(p.endswith("same prompt") for p in prompts)
    assert [r.max_new_tokens for r in direct + serve] == [4] * 4


def test_serve_vs_direct_pairs_each_request_with_its_twin():
    def result(start: float, first_token: float) -> RequestResult:
        return RequestResult(8, 4, start, token_times=[first_token], end=first_token + 1)

    direct = [result(0.0, 0.300), result(1.0, 1.100), result(2.0, 2.500)]
    serve = [result(0.5, 0.805), result(1.5, 1.700), result(2.5, 3.010)]
    added = paired_ttft_added_ms({"direct": (direct, 3.0), "serve": (serve, 3.0)})
    assert added == {"p10": 5.0, "p50": 10.0, "p90": 100.0}


@pytest.mark.parametrize(
    "argv, error",
    [
        # 64 requests in turns of 5 would leave 4 of them unsent, unsaid.
        (
            ["--num-requests-c1", "64", "--c1-block", "5"],
            "--c1-block must divide --num-requests-c1",
        ),
        (["--num-requests-c32", "128", "--rounds", "3"], "--rounds must divide --num-requests-c32"),
    ],
)
def test_serve_vs_direct_refuses_turns_that_would_drop_requests(argv, error, capsys):
    with pytest.raises(SystemExit):
        serve_vs_direct.main(argv)
    assert error in capsys.readouterr().err


def test_set_dotted_reaches_into_the_app_args_by_path():
    app_args = {"ingress": {"num_cpus": 0.1}, "models": [{"deployment": {"num_replicas": 1}}]}
    set_dotted(app_args, "ingress.num_replicas", "2")
    set_dotted(app_args, "models.0.deployment.stream_messages_per_s", "0")
    set_dotted(app_args, "models.0.launcher_args.max_batch_total_tokens", "1280")
    assert app_args == {
        "ingress": {"num_cpus": 0.1, "num_replicas": 2},
        "models": [{"deployment": {"num_replicas": 1, "stream_messages_per_s": 0},
                    "launcher_args": {"max_batch_total_tokens": 1280}}],
    }  # fmt: skip


def test_vs_llamacpp_turns_launcher_args_into_engine_flags():
    args = ["dtype=bfloat16", "quantize=eetq", "max_batch_total_tokens=4096"]
    assert vs_llamacpp.launcher_flags(args) == [
        "--max-batch-total-tokens", "4096", "--dtype", "bfloat16", "--quantize", "eetq"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad, error",
    [("dtype", "NAME=VALUE"), ("=bfloat16", "NAME=VALUE"), ("dtype=float8", "dtype"),
     ("max_batch_totl_tokens=4096", "max_batch_totl_tokens")],
)  # fmt: skip
def test_vs_llamacpp_refuses_a_launcher_arg_the_app_config_would(bad, error):
    # Refused before the llama.cpp build, which takes minutes.
    with pytest.raises(SystemExit, match=error):
        vs_llamacpp.main(["--launcher-arg", bad])
