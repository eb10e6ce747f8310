"""Scheduler policy: continuous batching, budgets, preemption, rejection. No torch, no model."""

import pytest

from engine.config import EngineConfig
from engine.protocol import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4
EOS = 99


def make_scheduler(
    num_tokens: int = 64,
    prefill: int = 32,
    batch: int | None = None,
    waiting_served_ratio: float = EngineConfig.waiting_served_ratio,
    max_waiting_tokens: int = EngineConfig.max_waiting_tokens,
) -> Scheduler:
    config = EngineConfig(
        model_dir="unused",
        max_batch_total_tokens=num_tokens,
        max_batch_prefill_tokens=prefill,
        max_batch_size=batch,
        block_size=BLOCK_SIZE,
        waiting_served_ratio=waiting_served_ratio,
        max_waiting_tokens=max_waiting_tokens,
    )
    return Scheduler(config)


def make_seq(request_id: str, num_prompt_tokens: int, max_new_tokens: int = 4) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=frozenset({EOS}))
    return Sequence(request_id, [1] * num_prompt_tokens, params, BLOCK_SIZE)


def step(scheduler: Scheduler, token_id: int = 7) -> tuple[list[str], bool]:
    """One engine step with a fake model that always produces `token_id`."""
    seqs, is_prefill = scheduler.schedule()
    ids = [seq.request_id for seq in seqs]
    if is_prefill:  # as LLMEngine.step: only sequences done reading their prompt sample
        seqs = scheduler.finish_prefill(seqs)
    scheduler.postprocess(seqs, [token_id] * len(seqs))
    return ids, is_prefill


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> int:
    for num_steps in range(max_steps):
        if not scheduler.has_unfinished_seqs():
            return num_steps
        step(scheduler)
    raise AssertionError("scheduler did not finish")


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert not scheduler.waiting and not scheduler.running


def test_prefill_then_decode_then_finish_by_length():
    scheduler = make_scheduler()
    seq = make_seq("a", 5, max_new_tokens=3)
    scheduler.add(seq)
    assert step(scheduler) == (["a"], True)
    assert step(scheduler) == (["a"], False)
    assert step(scheduler) == (["a"], False)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "length"
    assert seq.completion_token_ids == [7, 7, 7]
    assert scheduler.schedule() == ([], False)
    assert_all_blocks_free(scheduler)


def test_eos_finishes_and_frees():
    scheduler = make_scheduler()
    seq = make_seq("a", 3, max_new_tokens=10)
    scheduler.add(seq)
    step(scheduler)
    step(scheduler, token_id=EOS)
    assert seq.finish_reason == "eos_token" and seq.completion_token_ids == [7, EOS]
    assert_all_blocks_free(scheduler)


def test_prefill_budget_chunks_a_prompt_and_decodes_run_between_its_chunks():
    scheduler = make_scheduler(num_tokens=256, prefill=10)
    for i in range(3):
        scheduler.add(make_seq(f"r{i}", 4))
    assert step(scheduler) == (["r0", "r1", "r2"], True)  # 4 + 4 + the first 2 of r2's 4
    assert scheduler.prefilling[0].num_cached_tokens == 2
    assert step(scheduler) == (["r0", "r1"], False)  # r0 and r1 decode meanwhile
    assert step(scheduler) == (["r2"], True)  # the rest of r2's prompt
    assert step(scheduler) == (["r0", "r1", "r2"], False)


def test_a_prompt_longer_than_the_budget_is_read_in_chunks():
    scheduler = make_scheduler(num_tokens=256, prefill=8)
    scheduler.add(make_seq("long", 20, max_new_tokens=2))
    assert [step(scheduler) for _ in range(3)] == [(["long"], True)] * 3  # 8 + 8 + 4
    assert scheduler.running[0].num_completion_tokens == 1  # sampled at the last chunk only
    assert run_to_completion(scheduler) == 1
    assert_all_blocks_free(scheduler)


def test_max_batch_size_limits_running_sequences():
    scheduler = make_scheduler(num_tokens=256, batch=2)
    for i in range(3):
        scheduler.add(make_seq(f"r{i}", 2, max_new_tokens=3))
    assert step(scheduler) == (["r0", "r1"], True)
    assert step(scheduler) == (["r0", "r1"], False)  # r2 must wait for a free slot
    assert step(scheduler) == (["r0", "r1"], False)  # both finish here
    assert step(scheduler) == (["r2"], True)
    run_to_completion(scheduler)
    assert_all_blocks_free(scheduler)


def test_new_request_joins_between_decode_steps_and_finished_ones_leave():
    scheduler = make_scheduler(num_tokens=256)
    scheduler.add(make_seq("a", 3, max_new_tokens=3))
    step(scheduler)
    assert step(scheduler) == (["a"], False)
    scheduler.add(make_seq("b", 6, max_new_tokens=5))
    assert step(scheduler) == (["b"], True)  # prefill preferred over the next decode
    assert step(scheduler) == (["a", "b"], False)  # a finishes here
    assert step(scheduler) == (["b"], False)
    run_to_completion(scheduler)
    assert_all_blocks_free(scheduler)


def test_decode_out_of_blocks_preempts_newest_and_recomputes_it():
    # 4 blocks of 4 tokens. a and b each start with 1 block and grow.
    scheduler = make_scheduler(num_tokens=16, prefill=16)
    a, b = make_seq("a", 4, max_new_tokens=8), make_seq("b", 4, max_new_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler) == (["a", "b"], True)  # 2 blocks used
    assert step(scheduler) == (["a", "b"], False)  # each takes its 2nd block: 4 used
    for _ in range(3):
        step(scheduler)  # a, b now hold 4 + 5 tokens: the next decode needs a 3rd block each
    assert a.num_tokens == 9 and b.num_tokens == 9
    assert step(scheduler) == (["a"], False)  # b (newest) preempted to make room for a
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert list(scheduler.waiting) == [b]
    generated_before = b.completion_token_ids
    run_to_completion(scheduler)
    # b was recomputed from prompt + generated tokens and lost nothing.
    assert b.completion_token_ids[: len(generated_before)] == generated_before
    assert a.num_completion_tokens == b.num_completion_tokens == 8
    assert_all_blocks_free(scheduler)


def test_lone_sequence_that_fills_the_cache_still_finishes():
    scheduler = make_scheduler(num_tokens=16, prefill=16)
    seq = make_seq("a", 4, max_new_tokens=12)  # 16 tokens: exactly the whole cache
    scheduler.add(seq)
    run_to_completion(scheduler)
    assert seq.num_completion_tokens == 12
    assert_all_blocks_free(scheduler)


def test_heavy_contention_never_loses_a_request():
    scheduler = make_scheduler(num_tokens=32, prefill=16, batch=4)
    seqs = [make_seq(f"r{i}", 1 + i % 7, max_new_tokens=3 + (5 * i) % 11) for i in range(20)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, max_steps=2000)
    assert all(seq.num_completion_tokens == seq.params.max_new_tokens for seq in seqs)
    assert_all_blocks_free(scheduler)


def test_abort_waiting_and_running_frees_blocks():
    scheduler = make_scheduler(num_tokens=256)
    scheduler.add(make_seq("a", 5, max_new_tokens=10))
    step(scheduler)
    scheduler.add(make_seq("b", 5))
    assert scheduler.abort("a") is not None  # running
    assert scheduler.abort("b") is not None  # waiting
    assert scheduler.abort("b") is None  # already gone
    assert scheduler.abort("nope") is None
    assert_all_blocks_free(scheduler)
    assert not scheduler.has_unfinished_seqs()


def test_rejects_requests_that_can_never_be_served():
    scheduler = make_scheduler(num_tokens=16, prefill=8)
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add(make_seq("a", 8, max_new_tokens=9))  # 17 tokens > 16
    with pytest.raises(ValueError, match="max_batch_prefill_tokens"):  # never chunked
        params = SamplingParams(max_new_tokens=1, prefill_logprobs=True)
        scheduler.add(Sequence("b", [1] * 9, params, BLOCK_SIZE))
    with pytest.raises(ValueError, match="max_new_tokens"):
        scheduler.add(make_seq("c", 2, max_new_tokens=0))
    scheduler.add(make_seq("d", 8, max_new_tokens=8))  # exactly fits
    with pytest.raises(ValueError, match="in use"):
        scheduler.add(make_seq("d", 1))
    assert [seq.request_id for seq in scheduler.waiting] == ["d"]


def running_batch(size: int, waiting_served_ratio: float, max_waiting_tokens: int) -> Scheduler:
    """A scheduler whose batch of `size` long requests has just been prefilled."""
    scheduler = make_scheduler(512, 64, waiting_served_ratio=waiting_served_ratio,
                               max_waiting_tokens=max_waiting_tokens)  # fmt: skip
    ids = [f"r{i}" for i in range(size)]
    for request_id in ids:
        scheduler.add(make_seq(request_id, 4, max_new_tokens=50))
    assert step(scheduler) == (ids, True)
    return scheduler


def test_waiters_join_a_running_batch_only_by_tgis_ratio_or_after_max_waiting_tokens():
    scheduler = running_batch(4, waiting_served_ratio=0.5, max_waiting_tokens=3)
    scheduler.add(make_seq("late", 4, max_new_tokens=50))  # 1 waiting < floor(0.5 x 4)
    assert [step(scheduler)[1] for _ in range(2)] == [False] * 2  # decodes, late waits
    # TGI's waiting_tokens: the prefill counts as one step, so max_waiting_tokens=3 is
    # reached after two decodes.
    assert step(scheduler) == (["late"], True)
    scheduler.add(make_seq("a", 4, max_new_tokens=50))
    scheduler.add(make_seq("b", 4, max_new_tokens=50))  # 2 waiting >= floor(0.5 x 5) = 2
    assert step(scheduler) == (["a", "b"], True)
    for _ in range(3):  # 7 running decode: max_waiting_tokens passes with nobody waiting
        assert step(scheduler)[1] is False
    scheduler.add(make_seq("after_a_while", 4, max_new_tokens=50))  # 1 < floor(0.5 x 7)
    assert step(scheduler) == (["after_a_while"], True)  # no wait: 3 steps since a join


def test_a_lone_newcomer_joins_a_batch_of_up_to_six_at_once_at_tgis_default_ratio():
    scheduler = running_batch(6, waiting_served_ratio=0.3, max_waiting_tokens=20)
    assert step(scheduler)[1] is False
    scheduler.add(make_seq("seventh", 4, max_new_tokens=50))  # 1 >= floor(0.3 x 6) = 1
    assert step(scheduler) == (["seventh"], True)
    assert step(scheduler)[1] is False
    scheduler.add(make_seq("eighth", 4, max_new_tokens=50))  # 1 < floor(0.3 x 7) = 2
    assert step(scheduler)[1] is False
    scheduler.add(make_seq("ninth", 4, max_new_tokens=50))  # 2 >= 2
    assert step(scheduler) == (["eighth", "ninth"], True)


def test_no_starvation_under_continuous_arrivals():
    """A request arrives every step for 200 steps; each is let in within max_waiting_tokens
    decode steps (plus the prefill itself), and all of them finish."""
    scheduler = make_scheduler(4096, 64, waiting_served_ratio=1.2, max_waiting_tokens=5)
    arrived, started = {}, {}
    for t in range(400):
        if t < 200:
            scheduler.add(make_seq(f"r{t}", 6, max_new_tokens=30))
            arrived[f"r{t}"] = t
        ids, is_prefill = step(scheduler)
        if is_prefill:
            started.update({i: t for i in ids if i not in started})
        if t >= 200 and not scheduler.has_unfinished_seqs():
            break
    assert not scheduler.has_unfinished_seqs() and len(started) == 200
    assert max(started[i] - arrived[i] for i in arrived) <= scheduler.max_waiting_tokens + 1
