"""The side-by-side benchmark (a) end to end on a tiny workload: both sides, one report."""

import json

import pytest

from benchmarks import engine_vs_hf

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
