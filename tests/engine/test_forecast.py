"""First-token forecasts from scheduler snapshots: a rebuilt scheduler decides as the
original does, and the forecast's clock follows its steps. No torch, no model."""

import json

import pytest

from engine.config import EngineConfig
from engine.forecast import (
    SchedulerSnapshot,
    StepTimes,
    first_token_delay_s,
    rebuild_scheduler,
    take_snapshot,
)
from engine.protocol import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

BLOCK_SIZE = 4
STEPS = StepTimes(decode_s=0.010, prefill_base_s=0.010, prefill_s_per_token=0.001)


def make_scheduler(num_tokens: int = 64, prefill: int = 12) -> Scheduler:
    config = EngineConfig(model_dir="unused", max_batch_total_tokens=num_tokens,
                          max_batch_prefill_tokens=prefill, block_size=BLOCK_SIZE,
                          enable_prefix_caching=False)  # fmt: skip
    return Scheduler(config)


def make_seq(request_id: str, num_prompt_tokens: int, max_new_tokens: int) -> Sequence:
    return Sequence(request_id, [1] * num_prompt_tokens, SamplingParams(max_new_tokens), BLOCK_SIZE)


def step(scheduler: Scheduler) -> tuple[list[int], bool, int]:
    """One step of a model that never ends a sequence early: (each scheduled sequence's
    token count, is_prefill, free blocks after)."""
    seqs, is_prefill = scheduler.schedule()
    shape = [seq.num_tokens for seq in seqs]
    if is_prefill:
        seqs = scheduler.finish_prefill(seqs)
    scheduler.postprocess(seqs, [7] * len(seqs))
    return shape, is_prefill, scheduler.block_manager.num_free_blocks


def busy_scheduler(num_steps: int) -> Scheduler:
    """Three requests that outgrow the cache (48 tokens), a fourth after 4 steps. After 5
    steps one prompt is half read beside two running sequences and one waiting; after
    20, one sequence was preempted and waits with its generated tokens."""
    scheduler = make_scheduler(num_tokens=48)
    for request_id, num_prompt, max_new in [("a", 8, 20), ("b", 10, 16), ("c", 20, 10)]:
        scheduler.add(make_seq(request_id, num_prompt, max_new))
    for i in range(num_steps):
        step(scheduler)
        if i == 3:
            scheduler.add(make_seq("d", 16, 8))
    return scheduler


@pytest.mark.parametrize("num_steps", [5, 20])
def test_a_rebuilt_scheduler_makes_the_same_steps_as_the_original(num_steps):
    original = busy_scheduler(num_steps)
    snapshot = take_snapshot(original, STEPS)
    assert snapshot.running and snapshot.waiting  # the case is not trivial
    if num_steps == 5:
        assert snapshot.prefilling
    else:
        assert any(num_tokens > num_prompt for num_prompt, num_tokens, *_ in snapshot.waiting)
    # Through JSON, as routing stats travel.
    rebuilt = rebuild_scheduler(
        SchedulerSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))
    )
    assert rebuilt.block_manager.num_free_blocks == original.block_manager.num_free_blocks
    for _ in range(60):
        assert step(rebuilt) == step(original)
    assert not original.has_unfinished_seqs() and not rebuilt.has_unfinished_seqs()


def test_an_idle_engine_answers_after_one_prefill_step():
    snapshot = take_snapshot(make_scheduler(), STEPS)
    delay = first_token_delay_s(snapshot, [], (0.5, 10, 4), max_seq_steps=100)
    assert delay == pytest.approx(0.5 + 0.010 + 10 * 0.001)


def test_a_full_cache_delays_the_first_token_until_blocks_free():
    scheduler = make_scheduler(num_tokens=32)  # 8 blocks of 4 tokens
    scheduler.add(make_seq("long", 12, 16))
    step(scheduler)  # its prompt read, its first token out: 15 decode steps to go
    snapshot = take_snapshot(scheduler, STEPS)
    # 8 tokens take 2 blocks, beside the 4 "long" holds and 1 kept for its next token:
    # admitted at once, one prefill step.
    small = first_token_delay_s(snapshot, [], (0.0, 8, 2), max_seq_steps=1000)
    assert small == pytest.approx(0.010 + 8 * 0.001)
    # 20 tokens take 5 blocks: they wait until "long" ends, then come in two prefill
    # chunks (12 tokens a step at most).
    big = first_token_delay_s(snapshot, [], (0.0, 20, 4), max_seq_steps=1000)
    assert big == pytest.approx(15 * 0.010 + (0.010 + 12 * 0.001) + (0.010 + 8 * 0.001))


def test_requests_sent_since_the_snapshot_queue_ahead():
    snapshot = take_snapshot(make_scheduler(num_tokens=32), STEPS)
    alone = first_token_delay_s(snapshot, [], (0.0, 16, 4), max_seq_steps=1000)
    assert alone == pytest.approx((0.010 + 12 * 0.001) + (0.010 + 4 * 0.001))
    # One sent before it takes 6 of the 8 blocks: it waits for that one's 3 decode steps.
    behind = first_token_delay_s(snapshot, [(0.0, 24, 4)], (0.0, 16, 4), max_seq_steps=1000)
    assert behind == pytest.approx(2 * (0.010 + 12 * 0.001) + 3 * 0.010 + alone)


def test_a_forecast_stops_at_its_budget():
    scheduler = make_scheduler(num_tokens=32)
    scheduler.add(make_seq("long", 12, 16))
    step(scheduler)
    snapshot = take_snapshot(scheduler, STEPS)
    assert first_token_delay_s(snapshot, [], (0.0, 20, 4), max_seq_steps=5) is None
    too_big = (0.0, 40, 4)  # more than the whole cache: the engine refuses it
    assert first_token_delay_s(snapshot, [], too_big, max_seq_steps=1000) is None
    no_prompt = (0.0, 0, 4)  # a body the router estimates at 0 prompt tokens
    assert first_token_delay_s(snapshot, [no_prompt], no_prompt, max_seq_steps=1000) is None


def test_step_times_average_decode_steps_and_fit_a_line_to_prefill_steps():
    times = StepTimes()
    times.observe(is_prefill=False, num_tokens=4, seconds=0.020)
    assert times.decode_s == 0.020  # the first step sets it
    times.observe(is_prefill=False, num_tokens=4, seconds=0.030)
    assert times.decode_s == pytest.approx(0.021)
    times.observe(is_prefill=True, num_tokens=10, seconds=0.050)
    assert (times.prefill_base_s, times.prefill_s_per_token) == (0.050, 0.0)  # one size yet
    # Steps on the line 40 ms + 1 ms per token, a prefix-cache hit's 3 tokens among them.
    for num_tokens in (100, 3, 60, 200):
        times.observe(is_prefill=True, num_tokens=num_tokens, seconds=0.040 + 0.001 * num_tokens)
    assert times.prefill_base_s == pytest.approx(0.040)
    assert times.prefill_s_per_token == pytest.approx(0.001)
