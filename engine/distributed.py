"""Tensor-parallel shard processes: rank 0 (the engine process) spawns ranks 1..N-1, joins
them in one torch.distributed group and sends them every step's inputs.

Control channel: each worker's stdin is a pipe from rank 0 carrying pickled messages: one
`ShardStart`, then one `StepInputs` per step, then None to stop. A pipe rather than a
collective, because an idle engine sends nothing for hours (longer than a collective may wait)
and because its EOF tells a worker that rank 0 is gone. The process group (gloo on CPU, NCCL
on CUDA) carries only the collectives of the forward pass, each bounded by COLLECTIVE_TIMEOUT.

Failures never hang: rank 0's watchdog thread polls the workers, and when one exits unasked it
logs `shard R exited with code C; stopping`, kills the others and ends the process with status
1 (rank 0's engine thread may be blocked in a collective with the dead shard, and nothing short
of exiting unblocks it). A worker dies with rank 0 (PR_SET_PDEATHSIG, see engine/shard.py).
"""

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from engine.attention import AttentionMetadata
from engine.config import EngineConfig

log = logging.getLogger(__name__)

# Bounds every wait on another shard: the rendezvous (a shard starting Python and torch), the
# start-up handshake (shards loading their weights side by side) and each collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=2)
WATCHDOG_PERIOD_S = 0.2
STOP_GRACE_S = 5.0

# The directory holding the `engine` package, so that a worker imports this very engine.
_PROJECT_ROOT = Path(__file__).resolve().parents[1]

StepInputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata]  # input_ids, positions, meta


@dataclass(frozen=True)
class ShardStart:
    """A worker's first message: what it needs to join the group and load its share."""

    config: EngineConfig
    rank: int


def init_process_group(config: EngineConfig, rank: int, device: torch.device) -> None:
    """Join the group of config.num_shard ranks (blocks until all have joined, or times out)."""
    if device.type == "cpu":
        # CPU shards share this machine's cores. Oversubscribed, every all-reduce waits for a
        # descheduled peer: on 2 cores, 2 shards of 2 threads took ~700 ms per decode step
        # of 8 sequences, 2 shards of 1 thread ~145 ms.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // config.num_shard))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{config.master_addr}:{config.master_port}",
        rank=rank,
        world_size=config.num_shard,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def send(channel: IO[bytes], message: ShardStart | StepInputs | None) -> None:
    """Write one message to a worker's pipe (None: stop)."""
    pickle.dump(message, channel, protocol=pickle.HIGHEST_PROTOCOL)
    channel.flush()


class ShardGroup:
    """Rank 0's side: spawns the worker shards, sends them steps, watches and stops them.

    Spawn from the main thread: Linux sends the parent-death signal when the spawning
    *thread* ends.
    """

    def __init__(self, config: EngineConfig) -> None:
        self._num_threads = torch.get_num_threads()  # restored by stop(), see init_process_group
        self._stopping = threading.Event()
        self._workers = [self._spawn(config, rank) for rank in range(1, config.num_shard)]
        threading.Thread(target=self._watch, name="shard-watchdog", daemon=True).start()

    @staticmethod
    def _spawn(config: EngineConfig, rank: int) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        # The name (distinct per launcher through --shard-uds-path) shows in ps and log lines.
        name = f"{config.shard_uds_path}-{rank}"
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine.shard", name], stdin=subprocess.PIPE, env=env
        )
        assert worker.stdin is not None
        send(worker.stdin, ShardStart(config, rank))
        return worker

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1..N-1, in rank order."""
        return [worker.pid for worker in self._workers]

    def broadcast(self, step: StepInputs) -> None:
        """Send one step's inputs to every worker, on CPU (a pickled CUDA tensor would come
        back on GPU 0 whatever the worker's own device)."""
        input_ids, positions, meta = step
        cpu = torch.device("cpu")
        data = pickle.dumps((input_ids.to(cpu), positions.to(cpu), meta.to(cpu)),
                            protocol=pickle.HIGHEST_PROTOCOL)  # fmt: skip
        for worker in self._workers:
            assert worker.stdin is not None
            worker.stdin.write(data)
            worker.stdin.flush()

    def stop(self) -> None:
        """Ask the workers to exit, kill those still there after STOP_GRACE_S and leave the
        process group. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for worker in self._workers:
            assert worker.stdin is not None
            with contextlib.suppress(OSError):  # that worker is gone already
                send(worker.stdin, None)
                worker.stdin.close()
        for worker in self._workers:
            try:
                worker.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._num_threads)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCHDOG_PERIOD_S):
            for rank, worker in enumerate(self._workers, start=1):
                code = worker.poll()
                if code is not None and not self._stopping.is_set():
                    log.error("shard %d exited with code %d; stopping", rank, code)
                    for other in self._workers:
                        other.kill()  # a no-op for those already gone
                    os._exit(1)
