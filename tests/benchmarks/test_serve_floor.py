"""The floor half of benchmarks/serve_floor.py, run for real: a stub engine process and a
two-deployment Serve app in front of it, each side measured by streaming from it."""

import argparse

from benchmarks import serve_floor


def test_the_floor_streams_both_sides_and_pairs_them(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)  # through the proxy
    args = argparse.Namespace(
        requests=6, gap_s=0.0, stub_first_token_ms=40.0, cpu_wakeup_latency_us=None
    )
    report = serve_floor.floor(args)
    # Both sides waited for the stub's first token, so neither answered before its delay.
    assert report["ttft_p50_ms"]["direct"] >= 40.0
    assert report["ttft_p50_ms"]["serve"] >= 40.0
    added = report["added_ms_paired"]
    assert added["p10"] <= added["p50"] <= added["p90"]
