"""`BlockManager`: hands out fixed-size KV cache blocks to sequences (plain Python, no torch),
and keeps full blocks reusable across requests that share a prompt prefix.

Prefix cache: a full block is keyed by a chained hash of its token ids and every token before
it (hash of (previous block's hash, this block's ids)), registered once its KV is computed.
A hit is checked against the block's real ids. Blocks are ref-counted; a freed block keeps
its hash and content until the allocator hands it out again (least recently freed first),
so a later request can still hit it.

Invariant: every block is either referenced by running sequences (ref count > 0) or on the
free list (ref count 0); a RUNNING sequence's block table covers all its tokens.
"""

from collections import OrderedDict

from engine.sequence import Sequence

BlockKey = int  # chained hash of a full block's token ids and its prefix


class BlockManager:
    """Free-list allocator of KV blocks; the block ids index the model runner's cache tensors."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
        num_lookahead_slots: int = 0,
    ):  # fmt: skip
        """`num_lookahead_slots`: positions past its newest token a decoding sequence's
        blocks cover, for a step run before the host appends that token (decode_ahead.py)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.num_lookahead_slots = num_lookahead_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key_of: dict[int, tuple[BlockKey, tuple[int, ...]]] = {}  # block -> (key, ids)
        self._block_of: dict[BlockKey, int] = {}  # key -> block holding that content
        self.num_prefix_lookups = 0  # full prompt blocks looked up
        self.num_prefix_hits = 0  # ... and found

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence, num_reserved_blocks: int = 0) -> bool:
        """Whether `seq` can get blocks for all its tokens, leaving `num_reserved_blocks` free
        (prefix hits can only lower what it takes)."""
        return self.num_free_blocks >= seq.num_blocks + num_reserved_blocks

    def allocate(self, seq: Sequence, num_blocks: int | None = None) -> None:
        """Give a sequence that holds no blocks blocks for all its current tokens (or
        `num_blocks`, as many as it held when rebuilt from a snapshot): cached ones for its
        longest cached prefix (seq.num_cached_tokens), fresh ones for the rest."""
        assert not seq.block_table, f"{seq} already holds blocks"
        num_blocks = seq.num_blocks if num_blocks is None else num_blocks
        if self.num_free_blocks < num_blocks:
            raise RuntimeError(f"not enough free KV blocks for {seq}")
        if self.enable_prefix_caching and not seq.params.prefill_logprobs:
            self._take_cached_prefix(seq)
        while len(seq.block_table) < num_blocks:
            seq.block_table.append(self._take_free())

    def _take_cached_prefix(self, seq: Sequence) -> None:
        # At least the last token is always computed: its logits pick the next token.
        num_lookup_blocks = (seq.num_tokens - 1) // self.block_size
        key = None
        for i in range(num_lookup_blocks):
            ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = hash((key, ids))
            self.num_prefix_lookups += 1
            block = self._block_of.get(key)
            if block is None or self._key_of[block][1] != ids:
                return
            self.num_prefix_hits += 1
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.num_cached_tokens += self.block_size

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)  # least recently freed
        if block in self._key_of:  # its old content is about to be overwritten
            key, _ = self._key_of.pop(block)
            if self._block_of.get(key) == block:
                del self._block_of[key]
        self.ref_counts[block] = 1
        return block

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Make the sequence's full, computed blocks findable by later requests, now that
        their KV is in the cache (called after each prefill step)."""
        if not self.enable_prefix_caching:
            return
        key = None
        for i in range(seq.num_cached_tokens // self.block_size):
            ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = hash((key, ids))
            block = seq.block_table[i]
            if block not in self._key_of and key not in self._block_of:
                self._key_of[block] = (key, ids)
                self._block_of[key] = block

    def deallocate(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks go to the free list, last
        blocks first, so a prefix's first blocks stay cached the longest."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def num_append_blocks(self, seq: Sequence) -> int:
        """Blocks a running sequence lacks for its current tokens and lookahead slots (0 or
        1 between steps)."""
        num_blocks = -(-(seq.num_tokens + self.num_lookahead_slots) // self.block_size)
        return max(num_blocks - len(seq.block_table), 0)

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self.num_append_blocks(seq)

    def may_append(self, seq: Sequence) -> None:
        """Grow the block table, if needed, so it covers the token the next step writes."""
        if not self.can_append(seq):
            raise RuntimeError(f"not enough free KV blocks to extend {seq}")
        for _ in range(self.num_append_blocks(seq)):
            seq.block_table.append(self._take_free())
