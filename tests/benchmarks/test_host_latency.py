import os

import pytest

from benchmarks.host_latency import (
    CPU_DMA_LATENCY,
    cpu_wakeup_latency_held,
    cpu_wakeup_latency_us,
)

needs_pm_qos = pytest.mark.skipif(
    not os.access(CPU_DMA_LATENCY, os.R_OK | os.W_OK), reason=f"{CPU_DMA_LATENCY}: not root"
)


@needs_pm_qos
def test_the_cap_holds_inside_the_block_and_goes_after():
    before = cpu_wakeup_latency_us()
    with cpu_wakeup_latency_held(3):
        assert cpu_wakeup_latency_us() == 3
    assert cpu_wakeup_latency_us() == before


@needs_pm_qos
def test_none_leaves_the_host_as_it_is():
    before = cpu_wakeup_latency_us()
    with cpu_wakeup_latency_held(None):
        assert cpu_wakeup_latency_us() == before
