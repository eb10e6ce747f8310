"""BlockManager accounting: plain Python, no torch."""

import pytest

from engine.block_manager import BlockManager
from engine.protocol import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(num_tokens: int, request_id: str = "r") -> Sequence:
    return Sequence(
        request_id, list(range(num_tokens)), SamplingParams(max_new_tokens=8), BLOCK_SIZE
    )


def test_sequence_derived_counts():
    seq = make_seq(5)
    assert (seq.num_tokens, seq.num_blocks) == (5, 2)
    seq.append_token(9)
    seq.append_token(9)
    seq.append_token(9)
    assert (seq.num_tokens, seq.num_blocks) == (8, 2)
    assert seq.completion_token_ids == [9, 9, 9]
    assert seq.num_completion_tokens == 3


def test_allocate_and_deallocate_restore_free_count():
    bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    a, b = make_seq(5, "a"), make_seq(12, "b")
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 2 and len(b.block_table) == 3
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 5
    bm.deallocate(a)
    bm.deallocate(b)
    assert a.block_table == [] and b.block_table == []
    assert bm.num_free_blocks == bm.num_total_blocks == 10


def test_can_allocate_respects_free_blocks_and_reserve():
    bm = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    assert bm.can_allocate(make_seq(12))
    assert not bm.can_allocate(make_seq(13))
    assert not bm.can_allocate(make_seq(12), num_reserved_blocks=1)
    with pytest.raises(RuntimeError):
        bm.allocate(make_seq(13))


def test_append_takes_a_block_only_at_a_block_boundary():
    bm = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    seq = make_seq(4)
    bm.allocate(seq)
    assert bm.num_free_blocks == 2
    seq.append_token(1)  # 5th token starts block 2
    assert bm.num_append_blocks(seq) == 1
    bm.may_append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 1
    for _ in range(3):  # tokens 6..8 fill block 2
        seq.append_token(1)
        assert bm.num_append_blocks(seq) == 0
        bm.may_append(seq)
    assert bm.num_free_blocks == 1


def test_cannot_append_when_no_block_is_free():
    bm = BlockManager(num_blocks=1, block_size=BLOCK_SIZE)
    seq = make_seq(4)
    bm.allocate(seq)
    seq.append_token(1)
    assert not bm.can_append(seq)
    with pytest.raises(RuntimeError):
        bm.may_append(seq)
    bm.deallocate(seq)
    assert bm.num_free_blocks == 1


# --- prefix cache -------------------------------------------------------------------------


def seq_of(ids: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, ids, SamplingParams(max_new_tokens=8), BLOCK_SIZE)


def prefilled(bm: BlockManager, seq: Sequence) -> None:
    """What a prefill step does for the block manager: the tokens are computed, register."""
    seq.num_cached_tokens = seq.num_tokens
    bm.register_computed_blocks(seq)


def test_a_shared_prefix_hits_full_blocks_only_after_they_are_computed():
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = seq_of(list(range(10)), "a")  # blocks [0-3] [4-7] [8,9]
    bm.allocate(first)
    early = seq_of(list(range(10)), "early")
    bm.allocate(early)  # same prompt, but first's KV is not computed yet: no hit
    assert early.num_cached_tokens == 0
    prefilled(bm, first)
    second = seq_of(list(range(8)) + [42, 43, 44], "b")
    bm.allocate(second)
    assert second.num_cached_tokens == 8 and second.block_table[:2] == first.block_table[:2]
    assert [bm.ref_counts[b] for b in first.block_table[:2]] == [2, 2]
    whole = seq_of(list(range(8)), "c")  # the last token is always computed
    bm.allocate(whole)
    assert whole.num_cached_tokens == 4
    # a lookup stops at the first miss: a, early 1 each (miss), b 2 (hits), c 1 (hit)
    assert (bm.num_prefix_lookups, bm.num_prefix_hits) == (5, 3)


def test_freed_blocks_stay_hittable_until_reused():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = seq_of(list(range(9)), "a")
    bm.allocate(first)
    prefilled(bm, first)
    bm.deallocate(first)
    assert bm.num_free_blocks == 4
    again = seq_of(list(range(9)), "b")
    bm.allocate(again)
    assert again.num_cached_tokens == 8 and bm.num_free_blocks == 1
    bm.deallocate(again)
    other = seq_of([7] * 16, "c")  # takes every block: the old content is gone
    bm.allocate(other)
    bm.deallocate(other)
    late = seq_of(list(range(9)), "d")
    bm.allocate(late)
    assert late.num_cached_tokens == 0


def test_a_different_prefix_misses_and_caching_can_be_off():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = seq_of(list(range(9)), "a")
    bm.allocate(first)
    prefilled(bm, first)
    other = seq_of([0, 1, 2, 99, 4, 5, 6, 7, 8], "b")  # differs in the first block
    bm.allocate(other)
    assert other.num_cached_tokens == 0
    off = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = seq_of(list(range(9)), "a")
    off.allocate(first)
    prefilled(off, first)
    again = seq_of(list(range(9)), "b")
    off.allocate(again)
    assert again.num_cached_tokens == 0 and off.num_prefix_lookups == 0
