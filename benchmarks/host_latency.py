"""Keep the host's CPUs quick to wake while a latency benchmark runs.

An idle CPU drops into sleep states that take time to leave, and a request through Serve
wakes several processes (ingress, TGIServer, engine) where one straight to the engine wakes
one. Linux's PM QoS interface caps that exit latency for as long as /dev/cpu_dma_latency
is held open with a value written to it (what tuned's latency-performance profile does);
needs root.
"""

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

CPU_DMA_LATENCY = "/dev/cpu_dma_latency"


@contextmanager
def cpu_wakeup_latency_held(max_us: int | None) -> Iterator[None]:
    """Hold the host's CPU wake-up latency at `max_us` µs or less inside the block; None:
    leave the host as it is."""
    if max_us is None:
        yield
        return
    try:
        fd = os.open(CPU_DMA_LATENCY, os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"cannot hold the CPU wake-up latency ({exc}): run as root") from None
    try:
        os.write(fd, struct.pack("i", max_us))  # the request lasts while fd stays open
        yield
    finally:
        os.close(fd)


def cpu_wakeup_latency_us() -> int:
    """The cap in force now, in µs (2,000,000,000 when nothing holds one)."""
    with open(CPU_DMA_LATENCY, "rb") as f:
        return struct.unpack("i", f.read(4))[0]
