"""Fixtures for the engine tests."""

import pytest

from benchmarks.common import engine_process


@pytest.fixture
def record_preemptions():
    """`record_preemptions(engine)` -> the list every preempted request id is appended to."""

    def install(engine) -> list[str]:
        preempted: list[str] = []
        preempt = engine.scheduler._preempt

        def recording_preempt(seq):
            preempted.append(seq.request_id)
            preempt(seq)

        engine.scheduler._preempt = recording_preempt
        return preempted

    return install


@pytest.fixture(scope="module")
def small_engine_url(default_model_dir):
    """A real engine process with small limits (64 input, 128 total, 1024 KV tokens)."""
    flags = ["--model-id", str(default_model_dir), "--max-input-tokens", "64",
             "--max-total-tokens", "128", "--max-batch-total-tokens", "1024"]  # fmt: skip
    with engine_process(flags) as url:
        yield url
