"""When a new request would get its first token on an engine, forecast from a snapshot.

An engine's load figures (queue length, KV blocks free) cannot say when a request would
start on it: that depends on when its running sequences finish and free their blocks, who
waits ahead, and TGI's admission rule. `SchedulerSnapshot` holds what a `Scheduler` holds
(each sequence's length, budget and progress, the free KV blocks, the admission state) and
how long the engine's steps take; `first_token_delay_s` rebuilds a scheduler from it and
steps that forward in a model of time, with the requests sent to the engine since, until
the new request's first token. The request router (deployments/router.py) ranks replicas
by it. In simulation (benchmarks/routing_sim.py) a router doing this on snapshots 0.5 s
old came close to one that knew both engines exactly.

Plain Python, no torch: the router imports it.
"""

import time
from dataclasses import asdict, dataclass
from typing import Any

from engine.config import EngineConfig
from engine.protocol import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

# A sequence in a snapshot, a list of these numbers.
SEQ_STATE_FIELDS = ("prompt tokens", "tokens", "max new tokens", "tokens read", "KV blocks held")
SeqState = list[int]


def num_step_tokens(seqs: list[Sequence], is_prefill: bool) -> int:
    """Tokens a scheduled step computes: its prompt chunks, or one per decoding sequence."""
    return sum(s.prefill_chunk for s in seqs) if is_prefill else len(seqs)


@dataclass
class StepTimes:
    """How long the engine's steps take, from its own recent steps: a decode step's moving
    average, and a line fitted to the recent prefill steps' time against the tokens they
    computed. A prefill step has a fixed cost beside its per-token one: one that finds most
    of its prompt in the prefix cache computes a few tokens in a whole step's time."""

    decode_s: float = 0.0  # one decode step, whatever the batch
    prefill_base_s: float = 0.0  # a prefill step's fixed cost
    prefill_s_per_token: float = 0.0
    # Moving averages over prefill steps of (tokens n, seconds t, n * n, n * t).
    _prefill_moments: tuple[float, float, float, float] | None = None

    SMOOTHING = 0.1  # weight of the newest step

    def observe(self, is_prefill: bool, num_tokens: int, seconds: float) -> None:
        """Account one step that computed `num_tokens` tokens in `seconds`."""
        if not is_prefill:
            self.decode_s = seconds if not self.decode_s else self._mix(self.decode_s, seconds)
            return
        sample = (num_tokens, seconds, num_tokens * num_tokens, num_tokens * seconds)
        moments = self._prefill_moments or sample
        moments = tuple(self._mix(m, x) for m, x in zip(moments, sample, strict=True))
        self._prefill_moments = mean_n, mean_t, mean_nn, mean_nt = moments
        variance = mean_nn - mean_n * mean_n
        # Steps of (nearly) one size fix no slope: all their time counts as fixed.
        slope = (mean_nt - mean_n * mean_t) / variance if variance >= 1.0 else 0.0
        self.prefill_s_per_token = max(slope, 0.0)
        self.prefill_base_s = max(mean_t - self.prefill_s_per_token * mean_n, 0.0)

    def _mix(self, average: float, sample: float) -> float:
        return average + self.SMOOTHING * (sample - average)

    def of(self, seqs: list[Sequence], is_prefill: bool) -> float:
        if not is_prefill:
            return self.decode_s
        return self.prefill_base_s + self.prefill_s_per_token * num_step_tokens(seqs, True)


@dataclass(frozen=True)
class SchedulerSnapshot:
    """A scheduler's state at `taken_at` (time.time()), JSON-ready through `to_dict`."""

    taken_at: float
    block_size: int
    num_free_blocks: int
    max_batch_prefill_tokens: int
    max_batch_size: int | None
    waiting_served_ratio: float
    max_waiting_tokens: int
    num_steps_since_join: int
    last_step_was_prefill: bool
    waiting: list[SeqState]  # queue order: the next to join first
    prefilling: list[SeqState]  # admitted, prompt partly read
    running: list[SeqState]  # oldest first
    decode_s: float
    prefill_base_s: float
    prefill_s_per_token: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SchedulerSnapshot":
        """`to_dict` read back; ValueError (or TypeError) if it is not one (an engine of
        another version)."""
        snapshot = cls(**data)
        states = snapshot.waiting + snapshot.prefilling + snapshot.running
        if not all(len(state) == len(SEQ_STATE_FIELDS) for state in states):
            raise ValueError(f"sequence states are not {SEQ_STATE_FIELDS}")
        return snapshot


def take_snapshot(scheduler: Scheduler, step_times: StepTimes) -> SchedulerSnapshot:
    def states(seqs) -> list[SeqState]:
        return [[s.num_prompt_tokens, s.num_tokens, s.params.max_new_tokens,
                 s.num_cached_tokens, len(s.block_table)] for s in seqs]  # fmt: skip

    return SchedulerSnapshot(
        taken_at=time.time(), block_size=scheduler.block_size,
        num_free_blocks=scheduler.block_manager.num_free_blocks,
        max_batch_prefill_tokens=scheduler.max_batch_prefill_tokens,
        max_batch_size=scheduler.max_batch_size,
        waiting_served_ratio=scheduler.waiting_served_ratio,
        max_waiting_tokens=scheduler.max_waiting_tokens,
        num_steps_since_join=scheduler.num_steps_since_join,
        last_step_was_prefill=scheduler.last_step_was_prefill,
        waiting=states(scheduler.waiting), prefilling=states(scheduler.prefilling),
        running=states(scheduler.running),
        decode_s=step_times.decode_s, prefill_base_s=step_times.prefill_base_s,
        prefill_s_per_token=step_times.prefill_s_per_token,
    )  # fmt: skip


def first_token_delay_s(
    snapshot: SchedulerSnapshot,
    sent_since: list[tuple[float, int, int]],
    request: tuple[float, int, int],
    max_seq_steps: int,
) -> float | None:
    """Seconds after the snapshot until `request` gets its first token, or None if not
    found within `max_seq_steps` sequences stepped (a step of n sequences counts n: that
    is what a forecast costs). `request` and each of `sent_since` (the requests
    sent to the engine after the snapshot) are (seconds after the snapshot it reaches the
    engine, prompt tokens, max new tokens). Every sequence is taken to run to its max new
    tokens; an earlier end (EOS, a stop sequence) only brings the first token closer."""
    scheduler = rebuild_scheduler(snapshot)
    step_times = StepTimes(snapshot.decode_s, snapshot.prefill_base_s, snapshot.prefill_s_per_token)
    arrivals = sorted(sent_since) + [request]  # the request last among equals
    target_id = f"arrival-{len(arrivals) - 1}"
    arrivals_ids = [(at, f"arrival-{i}", p, n) for i, (at, p, n) in enumerate(arrivals)]
    now = 0.0
    num_seq_steps = 0
    while num_seq_steps < max_seq_steps:
        while arrivals_ids and arrivals_ids[0][0] <= now:
            _, request_id, num_prompt_tokens, max_new_tokens = arrivals_ids.pop(0)
            try:
                scheduler.add(_sequence(request_id, num_prompt_tokens, num_prompt_tokens,
                                        max_new_tokens, snapshot.block_size))  # fmt: skip
            except ValueError:  # no prompt, or more than the cache holds: the engine refuses it
                if request_id == target_id:
                    return None
        if not scheduler.has_unfinished_seqs():
            now = arrivals_ids[0][0]
            continue
        seqs, is_prefill = scheduler.schedule()
        num_seq_steps += len(seqs)
        now += step_times.of(seqs, is_prefill)
        if is_prefill:
            seqs = scheduler.finish_prefill(seqs)
        if any(seq.request_id == target_id for seq in seqs):
            return now
        scheduler.postprocess(seqs, [0] * len(seqs))  # no EOS: each runs to its budget
    return None


def rebuild_scheduler(snapshot: SchedulerSnapshot) -> Scheduler:
    """A scheduler holding the snapshot's sequences (fake token ids, no prefix cache) and
    as many free blocks as the engine had: it makes the steps the engine's would."""
    held = [state[4] for state in snapshot.prefilling + snapshot.running]
    num_blocks = sum(held) + snapshot.num_free_blocks
    config = EngineConfig(
        model_dir="", max_batch_total_tokens=max(num_blocks, 1) * snapshot.block_size,
        max_batch_prefill_tokens=snapshot.max_batch_prefill_tokens,
        max_batch_size=snapshot.max_batch_size, enable_prefix_caching=False,
        waiting_served_ratio=snapshot.waiting_served_ratio,
        max_waiting_tokens=snapshot.max_waiting_tokens, block_size=snapshot.block_size,
    )  # fmt: skip
    scheduler = Scheduler(config)
    scheduler.num_steps_since_join = snapshot.num_steps_since_join
    scheduler.last_step_was_prefill = snapshot.last_step_was_prefill
    for queue in ("waiting", "prefilling", "running"):
        for i, state in enumerate(getattr(snapshot, queue)):
            num_prompt, num_tokens, max_new, num_read, num_blocks = state
            seq = _sequence(f"{queue}-{i}", num_prompt, num_tokens, max_new, snapshot.block_size)
            seq.num_cached_tokens = num_read
            scheduler.restore(seq, queue, num_blocks)
    return scheduler


def _sequence(
    request_id: str, num_prompt_tokens: int, num_tokens: int, max_new_tokens: int, block_size: int
) -> Sequence:
    seq = Sequence(request_id, [0] * num_prompt_tokens, SamplingParams(max_new_tokens), block_size)
    seq.token_ids.extend([0] * (num_tokens - num_prompt_tokens))  # the tokens it generated
    return seq
