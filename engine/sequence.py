"""`Sequence`: the state of one request inside the engine core.

It owns the token ids (prompt followed by generated ones), the KV block table and the status;
everything else is derived with properties so it can never go stale.
"""

import math
from enum import Enum, auto

from engine.protocol import FinishReason, SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # queued; holds no KV blocks
    RUNNING = auto()  # prefilled; holds blocks for its tokens
    FINISHED = auto()  # done or aborted; holds no blocks


class Sequence:
    """One request: token ids, KV block table and progress, with no torch dependency."""

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, block_size: int
    ) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.block_size = block_size
        self.block_table: list[int] = []
        # Leading tokens whose KV is in the cache: a prefix cache hit's, then each prefill
        # chunk's. A decoding sequence has all but its newest token computed.
        self.num_cached_tokens = 0
        self.prefill_chunk = 0  # tokens the current prefill step computes (set by the scheduler)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Where the generated tokens stand in the request's grammar, if it has one. Advanced
        # by append_token, so it always matches completion_token_ids: a preempted sequence
        # keeps its generated tokens (it is recomputed, not restarted), and so its state.
        self.grammar = params.grammar.new_state() if params.grammar is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, num_tokens={self.num_tokens}, "
            f"num_blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def max_num_tokens(self) -> int:
        """Tokens this sequence holds at most: prompt plus every allowed new token."""
        return self.num_prompt_tokens + self.params.max_new_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold the KV of all current tokens."""
        return math.ceil(self.num_tokens / self.block_size)

    @property
    def needs_prefill_logprobs(self) -> bool:
        """Asked for prompt logprobs and not yet given them: only a request's first prefill has
        no generated token (a preempted sequence is recomputed with at least one)."""
        return self.params.prefill_logprobs and self.num_completion_tokens == 0

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def completes_prefill(self) -> bool:
        """Whether the current prefill chunk reaches the last token (which then samples)."""
        return self.num_cached_tokens + self.prefill_chunk == self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.advance(token_id)
