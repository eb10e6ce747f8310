"""Block-manager invariants under random allocate / register / append / free sequences
(hypothesis): no double free, ref counts match the block tables, free count restored."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.protocol import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 12

# Prompts drawn from a tiny vocabulary, so prefixes are often shared.
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=20)
operations = st.lists(
    st.tuples(st.sampled_from(["add", "register", "append", "free"]), prompts, st.integers(0, 7)),
    max_size=60,
)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    referenced = Counter(block for seq in live for block in seq.block_table)
    for block in range(NUM_BLOCKS):
        assert bm.ref_counts[block] == referenced[block]
    assert bm.num_free_blocks == NUM_BLOCKS - len(referenced)
    for seq in live:  # every live sequence's tokens are covered by its blocks
        assert len(seq.block_table) == seq.num_blocks
        assert len(set(seq.block_table)) == len(seq.block_table)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_operations_keep_the_books_straight(ops):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    live: list[Sequence] = []
    for i, (op, prompt, pick) in enumerate(ops):
        if op == "add":
            seq = Sequence(str(i), prompt, SamplingParams(max_new_tokens=4), BLOCK_SIZE)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                assert seq.num_cached_tokens < seq.num_tokens
                live.append(seq)
        elif live:
            seq = live[pick % len(live)]
            if op == "register":  # a prefill step ran: all its tokens are computed
                seq.num_cached_tokens = seq.num_tokens
                bm.register_computed_blocks(seq)
            elif op == "append":
                seq.append_token(pick % 3)
                if bm.can_append(seq):
                    bm.may_append(seq)
                else:
                    seq.token_ids.pop()
            else:
                bm.deallocate(seq)
                live.remove(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.deallocate(seq)
    assert bm.num_free_blocks == NUM_BLOCKS and not any(bm.ref_counts)
