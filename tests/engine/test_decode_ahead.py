"""Decode ahead's bookkeeping (CPU): which sequences may have their next step launched
before the host sees their token, where a launched step's rows sit in the batch the scheduler
picks next, and the lookahead block that gives that step a K/V slot. The GPU path itself is
tested in test_cuda_graphs.py."""

import pytest
import torch
from transformers import AutoTokenizer

from engine.batch_inputs import BatchInputBuilder
from engine.block_manager import BlockManager
from engine.decode_ahead import batch_rows, can_run_ahead
from engine.grammar import GrammarCompiler, GrammarSpec
from engine.protocol import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4


def running(num_tokens: int, num_blocks: int, request_id: str = "r", **params) -> Sequence:
    seq = Sequence(request_id, list(range(num_tokens)),
                   SamplingParams(max_new_tokens=params.pop("max_new_tokens", 8), **params),
                   BLOCK_SIZE)  # fmt: skip
    seq.block_table = list(range(num_blocks))
    return seq


def test_the_next_position_must_be_in_a_held_block():
    assert can_run_ahead(running(num_tokens=5, num_blocks=2))  # next position 5: block 1
    assert not can_run_ahead(running(num_tokens=8, num_blocks=2))  # position 8: block 2
    assert can_run_ahead(running(num_tokens=8, num_blocks=3))  # the lookahead block


@pytest.mark.parametrize(
    "params",
    [
        {"repetition_penalty": 1.2},
        {"frequency_penalty": 0.5},
        {"presence_penalty": 0.5},
        {"watermark": True},
        {"top_n_tokens": 2},
        {"do_sample": True, "seed": 7},
    ],
)
def test_what_the_host_adds_per_token_rules_it_out(params):
    assert not can_run_ahead(running(num_tokens=5, num_blocks=2, **params))


def test_a_grammar_rules_it_out(default_model_dir):
    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(default_model_dir), 49152,
                               frozenset({2}))  # fmt: skip
    grammar = compiler.compile(GrammarSpec("regex", "[ab]+"))
    assert not can_run_ahead(running(num_tokens=5, num_blocks=2, grammar=grammar))


@pytest.mark.parametrize(
    "params", [{}, {"do_sample": True}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}]
)
def test_greedy_and_unseeded_sampling_may_run_ahead(params):
    assert can_run_ahead(running(num_tokens=5, num_blocks=2, **params))


def test_batch_rows_of_the_same_batch_and_of_what_is_left_of_it():
    a, b, c = (running(5, 2, "a"), running(7, 2, "b"), running(3, 1, "c"))
    launched = (("a", "b", "c"), (5, 7, 3))
    assert batch_rows(*launched, [a, b, c]) == [0, 1, 2]
    assert batch_rows(*launched, [a, c]) == [0, 2]  # b finished
    assert batch_rows(*launched, [c, a]) is None  # another order: not the launched rows
    assert batch_rows(*launched, [a, b, c, running(4, 1, "d")]) is None  # d joined
    b.append_token(1)
    assert batch_rows(*launched, [a, b, c]) is None  # b moved on: another step's batch


def test_a_lookahead_slot_gets_its_block_one_step_early():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, num_lookahead_slots=1)
    seq = Sequence("r", list(range(4)), SamplingParams(max_new_tokens=8), BLOCK_SIZE)
    bm.allocate(seq)
    assert len(seq.block_table) == 1  # a prompt gets blocks for its tokens only
    bm.may_append(seq)
    assert len(seq.block_table) == 2  # position 4, where a step run ahead writes
    for num_tokens, num_blocks in [(5, 2), (6, 2), (7, 2), (8, 3)]:
        seq.append_token(9)
        bm.may_append(seq)
        assert (seq.num_tokens, len(seq.block_table)) == (num_tokens, num_blocks)
    without = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert without.num_append_blocks(running(num_tokens=8, num_blocks=2)) == 0


def test_decode_inputs_write_the_newest_token_where_it_is_not_in_the_lookahead_block():
    builder = BatchInputBuilder(BLOCK_SIZE, torch.device("cpu"), paged_decode=True)
    full = running(num_tokens=8, num_blocks=3)  # blocks 0, 1 full; 2 is the lookahead block
    full.block_table = [5, 2, 7]
    partial = running(num_tokens=6, num_blocks=2, request_id="p")
    partial.block_table = [4, 1]
    input_ids, positions, meta = builder.prepare_decode([full, partial])
    assert positions.tolist() == [7, 5]
    assert meta.slot_mapping.tolist() == [2 * BLOCK_SIZE + 3, 1 * BLOCK_SIZE + 1]
    assert meta.context_lens.tolist() == [8, 6]
