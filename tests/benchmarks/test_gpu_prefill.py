import json

import pytest
import torch

from benchmarks.gpu_prefill import main

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_reports_graphed_and_eager_prefill_per_case(tmp_path):
    out = tmp_path / "prefill.json"
    main(["--shape", "smollm2", "--cases", "0+16,32+16", "--reps", "2",
          "--work-dir", str(tmp_path), "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["prefill_step"]
    assert [(r["cached_tokens"], r["new_tokens"]) for r in rows] == [(0, 16), (32, 16)]
    assert all(r["graphed_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
    assert all(r["graphed_by_default"] for r in rows)  # SmolLM2: every bucket
