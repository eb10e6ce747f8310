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
    assert (seq.num_tokens, seq.num_blocks, seq.last_block_num_tokens) == (5, 2, 1)
    seq.append_token(9)
    seq.append_token(9)
    seq.append_token(9)
    assert (seq.num_tokens, seq.num_blocks, seq.last_block_num_tokens) == (8, 2, 4)
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
