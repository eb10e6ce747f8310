"""Torch work done through `on_own_thread` leaves no OpenMP team behind (see its docstring
for what a second team costs the engine loop), and its result or error comes back."""

import subprocess
import sys

import pytest

from engine.async_engine import on_own_thread

# The ended thread's OpenMP workers exit on their own just after it: waited for, up to 5 s.
COUNT_THREADS = """
import os, time, torch
from engine.async_engine import on_own_thread
torch.set_num_threads(2)
def threads(): return len(os.listdir("/proc/self/task"))
def matmul(): return float((torch.ones(512, 512) @ torch.ones(512, 512)).sum())
start = threads()
result = on_own_thread(matmul)
deadline = time.monotonic() + 5
while threads() != start and time.monotonic() < deadline:
    time.sleep(0.01)
after_own_thread = threads()
matmul()
print(start, after_own_thread, threads(), result)
"""


def test_a_threads_torch_work_ends_with_it():
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS], capture_output=True,
                         text=True, check=True, timeout=120).stdout  # fmt: skip
    start, after_own_thread, after_main, result = out.split()
    assert float(result) == 512.0**3
    assert int(after_own_thread) == int(start)  # the thread's OpenMP worker went with it
    assert int(after_main) > int(start)  # the same work on the main thread keeps one


def test_the_result_or_the_error_comes_back():
    assert on_own_thread(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        on_own_thread(divmod, 1, 0)
