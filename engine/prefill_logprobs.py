"""Prompt tokens' logprobs for requests that ask (TGI's `decoder_input_details`), from the
hidden states of an eager prefill step."""

import torch

from engine.batch_inputs import BatchInputBuilder
from engine.models.llama import LlamaForCausalLM
from engine.sequence import Sequence

# Prompt positions whose logits are computed at once: bounds the step's extra memory to
# PREFILL_LOGITS_CHUNK * vocab floats.
PREFILL_LOGITS_CHUNK = 1024


def compute_prefill_logprobs(
    model: LlamaForCausalLM,
    inputs: BatchInputBuilder,
    hidden: torch.Tensor,  # [n, hidden] the packed prefill batch
    seqs: list[Sequence],
) -> list[tuple[float | None, ...] | None]:
    """Per sequence that asks, each prompt token's logprob given the tokens before it.

    Raw model distribution (no processors), as TGI's prefill tokens. Only the asking
    sequences' positions get logits.
    """
    rows: list[int] = []  # positions whose logits predict a prompt token
    targets: list[int] = []  # the token each of those positions predicts
    start = 0
    for seq in seqs:
        # The block manager never serves a cached prefix to these sequences, so all of
        # their tokens are in this batch.
        if seq.needs_prefill_logprobs:
            rows.extend(range(start, start + seq.num_tokens - 1))
            targets.extend(seq.token_ids[1:])
        start += seq.prefill_chunk
    if not rows:
        return [None] * len(seqs)
    logprobs: list[float] = []  # [r]
    for chunk in range(0, len(rows), PREFILL_LOGITS_CHUNK):  # bounds the [r, vocab] logits
        chunk_rows = inputs.tensor(rows[chunk : chunk + PREFILL_LOGITS_CHUNK])
        chunk_targets = inputs.tensor(targets[chunk : chunk + PREFILL_LOGITS_CHUNK])
        logits = model.compute_logits(hidden[chunk_rows]).float()  # [c, vocab]
        chosen = logits.gather(1, chunk_targets[:, None])[:, 0]  # [c]
        logprobs.extend((chosen - logits.logsumexp(dim=-1)).tolist())
    out: list[tuple[float | None, ...] | None] = []
    offset = 0
    for seq in seqs:
        if seq.needs_prefill_logprobs:
            end = offset + seq.num_tokens - 1
            out.append((None, *logprobs[offset:end]))
            offset = end
        else:
            out.append(None)
    return out
