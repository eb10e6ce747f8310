"""Decode ahead: on CUDA graphs, launch step N+1 from step N's tokens while they are still on
the GPU.

A synchronous decode step leaves the GPU idle while the host reads the sampled tokens back,
appends them, schedules, builds the next inputs and launches the next graph: ~0.6 ms of a
~4.9 ms batch-1 step on an H200 (benchmarks/gpu_decode_profile.py). When the next step is
predictable -- the same sequences decode again and none needs the host between the two steps
-- the runner enqueues it right behind the current one, feeding each sequence the token it
just sampled on the device, and only then waits for the current step's tokens. The host's
work then runs while the GPU computes (measured in docs/benchmarks.md).

The early step is taken if the next batch is that batch, or an ordered part of it once
sequences that hit EOS or were aborted have left (`rows_for`); anything else (a request
joined, one was preempted) drops it. Its one side effect is the K/V it wrote at each
sequence's next position: a slot of a block the sequence already holds (`can_run_ahead`),
with the K/V of the token it did sample. A later step writes the same values there again,
or the block is freed and reused by work queued after it on the same stream.
"""

from dataclasses import dataclass

import torch

from engine.sampling import SamplerOutput, TopTokens
from engine.sequence import Sequence


def can_run_ahead(seq: Sequence) -> bool:
    """Whether the step after this one can run before the host sees this step's token: its
    logits need nothing the host adds per token (penalties and watermark read the token
    history, a grammar advances on it, top tokens are read back, a seeded draw must not be
    spent on a step that may be dropped), and its next position's K/V slot is in a block it
    holds (the scheduler's lookahead slot)."""
    params = seq.params
    needs_host = (
        params.has_penalties
        or params.watermark
        or params.grammar is not None
        or params.top_n_tokens > 0
        or (params.seed is not None and not params.is_greedy)
    )
    next_position = seq.num_tokens  # where the token this step samples is written next step
    return not needs_host and next_position < len(seq.block_table) * seq.block_size


@dataclass
class DeviceStep:
    """A decode step's sampled tokens: on the GPU at once, on the host once `done` fires."""

    request_ids: tuple[str, ...]  # the batch, in order
    num_tokens: tuple[int, ...]  # each sequence's token count at this step (its input last)
    token_ids: torch.Tensor  # [b] int64, on the GPU: the next step's inputs
    top_tokens: list[TopTokens]  # [b]
    host: torch.Tensor  # [2, b] float64, pinned: token ids and logprobs, copied when done
    done: torch.cuda.Event

    @classmethod
    def enqueue(cls, seqs: list[Sequence], sampled: SamplerOutput, ahead: int) -> "DeviceStep":
        """Queue the copy of `sampled` to the host. `ahead`: the tokens the sequences gain
        before this step is theirs (1 for a step run ahead, 0 for the current one)."""
        host = torch.empty((2, len(seqs)), dtype=torch.float64, pin_memory=True)
        host.copy_(torch.stack([sampled.token_ids.double(), sampled.logprobs.double()]),
                   non_blocking=True)  # fmt: skip
        done = torch.cuda.Event()
        done.record()
        return cls(
            request_ids=tuple(seq.request_id for seq in seqs),
            num_tokens=tuple(seq.num_tokens + ahead for seq in seqs),
            token_ids=sampled.token_ids,
            top_tokens=sampled.top_tokens,
            host=host,
            done=done,
        )

    def rows_for(self, seqs: list[Sequence]) -> list[int] | None:
        """The rows of this step that computed `seqs`' next tokens, in order, or None if it
        did not: the batch must be this step's, less sequences that finished (in the same
        order, which the scheduler keeps), each at the token count it has now."""
        return batch_rows(self.request_ids, self.num_tokens, seqs)

    def result(self, rows: list[int] | None = None) -> tuple[list[int], list[float]]:
        """(token ids, logprobs) of `rows` (default all), waiting for this step alone, not
        for one queued after it."""
        self.done.synchronize()
        token_ids, logprobs = self.host.tolist()
        if rows is not None:
            token_ids, logprobs = [token_ids[r] for r in rows], [logprobs[r] for r in rows]
        return [int(t) for t in token_ids], logprobs


def batch_rows(
    request_ids: tuple[str, ...], num_tokens: tuple[int, ...], seqs: list[Sequence]
) -> list[int] | None:
    """Where each of `seqs` sits in a batch of (request_ids, num_tokens), or None unless they
    are an ordered sub-batch of it at the same token counts."""
    row_of = {request_id: row for row, request_id in enumerate(request_ids)}
    rows = [row_of.get(seq.request_id) for seq in seqs]
    if any(row is None for row in rows) or rows != sorted(rows):
        return None
    if any(num_tokens[row] != seq.num_tokens for row, seq in zip(rows, seqs, strict=True)):
        return None
    return rows
