"""Fixtures for the engine tests."""

import pytest


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
