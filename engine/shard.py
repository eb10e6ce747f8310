"""`python -m engine.shard NAME`: one tensor-parallel worker shard (rank >= 1).

Spawned by the engine process, rank 0 (see engine/distributed.py), never by hand. It reads a
`ShardStart` and then step inputs from stdin, runs each step's forward pass over its share of
the model (sampling is rank 0's), and exits on the stop message, on EOF (rank 0 closed the
pipe) or when rank 0 dies (PR_SET_PDEATHSIG). SIGINT and SIGTERM are rank 0's to act on.
"""

import ctypes
import logging
import pickle
import signal
import sys
from typing import IO

import torch
from transformers import AutoConfig

from engine.distributed import ShardStart
from engine.model_runner import ModelRunner

log = logging.getLogger("engine.shard")

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    (name,) = argv
    _die_with_parent()
    # Only rank 0 stops a shard: a signal to the whole process group (Ctrl-C, a supervisor's
    # SIGTERM) reaches rank 0 too, whose shutdown sends the stop message; were the shards to
    # die of it first, rank 0's watchdog would report their exit as a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name}: %(message)s")  # fmt: skip
    channel = sys.stdin.buffer
    try:
        start: ShardStart = pickle.load(channel)
        config = start.config
        runner = ModelRunner(config, AutoConfig.from_pretrained(config.model_dir), start.rank)
        serve_steps(runner, channel)
    except EOFError:  # rank 0 is gone without a word; the process group is gone with it
        log.error("rank 0 closed the channel; exiting")
        return 1
    return 0


@torch.inference_mode()
def serve_steps(runner: ModelRunner, channel: IO[bytes]) -> None:
    """Run the forward pass of every step rank 0 sends, until its stop message (None)."""
    while (step := pickle.load(channel)) is not None:
        input_ids, positions, meta = step
        device = runner.device
        runner.forward(input_ids.to(device), positions.to(device), meta.to(device))


def _die_with_parent() -> None:
    """Have Linux SIGKILL this process when rank 0 dies: it may be blocked in a collective
    that nothing else would end."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
