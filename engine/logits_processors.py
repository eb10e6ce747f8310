"""Logits processors and warpers, in TGI's order, each over the rows of a batch that use it.

Grammar-constrained rows (TGI's `grammar`) get their mask between the penalties and the
warpers, as in TGI, so the warpers renormalise over the tokens the grammar allows; rows with
different grammars, and rows with none, share the batch.

`process_logits` runs each step of `PIPELINE` as one vectorised call on just the rows that use
it, and skips it when no row does, so plain requests pay only a few Python checks. The
processors are small pure functions over `[s, vocab]` float scores with per-row parameters;
masked tokens get -inf, like transformers' warpers (which the tests use as references).
"""

from collections.abc import Callable

import torch

from engine.grammar_mask import allowed_tokens
from engine.protocol import SamplingParams
from engine.sequence import Sequence

# TGI's WatermarkLogitsProcessor defaults: bias a gamma share of the vocabulary by delta.
WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_HASH_KEY = 15485863  # a large prime, so hash_key * previous token spreads the seeds

RowTransform = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]


def padded_token_ids(
    token_ids: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # [s, max_len] int64, [s, max_len] bool
    """Each row's token ids, padded with its own first id, and which entries are real.

    Padding with an id the row already has keeps gather / scatter of penalties exact: a
    repeated id gathers and scatters back the same value.
    """
    max_len = max(len(ids) for ids in token_ids)
    padded = [ids + [ids[0]] * (max_len - len(ids)) for ids in token_ids]
    lengths = torch.tensor([len(ids) for ids in token_ids])
    is_real = torch.arange(max_len)[None] < lengths[:, None]
    return torch.tensor(padded).to(device), is_real.to(device)


def watermark_greenlist(previous_token_id: int, vocab_size: int) -> torch.Tensor:
    """The ids favoured after `previous_token_id`: a seeded random gamma share of the vocab."""
    # A CPU generator, so the green list does not depend on the device we run on.
    generator = torch.Generator().manual_seed(WATERMARK_HASH_KEY * previous_token_id)
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[: int(vocab_size * WATERMARK_GAMMA)]


def apply_watermark(
    scores: torch.Tensor,  # [s, vocab]
    previous_token_ids: list[int],  # [s]
) -> torch.Tensor:  # [s, vocab]
    s, vocab = scores.shape
    green = torch.zeros(s, vocab, dtype=torch.bool)
    for row, token_id in enumerate(previous_token_ids):  # one randperm per row
        green[row, watermark_greenlist(token_id, vocab)] = True
    return scores + green.to(scores.device) * WATERMARK_DELTA


def apply_repetition_penalty(
    scores: torch.Tensor,  # [s, vocab]
    history: torch.Tensor,  # [s, len] prompt + generated ids (padded_token_ids)
    penalties: torch.Tensor,  # [s]
) -> torch.Tensor:  # [s, vocab]
    # CTRL / HF rule, once per distinct seen token: dividing a negative logit would raise it,
    # so those are multiplied. Touches only the seen tokens, not the whole vocabulary.
    seen = scores.gather(1, history)  # [s, len]
    penalties = penalties[:, None]
    return scores.scatter(1, history, torch.where(seen < 0, seen * penalties, seen / penalties))


def apply_frequency_penalty(
    scores: torch.Tensor,  # [s, vocab]
    history: torch.Tensor,  # [s, len] prompt + generated ids (padded_token_ids)
    is_real: torch.Tensor,  # [s, len] False on padding
    penalties: torch.Tensor,  # [s]
) -> torch.Tensor:  # [s, vocab]
    # TGI's rule: logits -= penalty * count / num_tokens (OpenAI uses raw counts), added here
    # once per occurrence.
    num_tokens = is_real.sum(dim=-1)  # [s]
    per_occurrence = (-penalties / num_tokens)[:, None] * is_real  # [s, len]
    return scores.scatter_add(1, history, per_occurrence.to(scores.dtype))


def apply_top_k(scores: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:  # [s, vocab]
    """Keep the tokens scoring at least the k-th best score of their row (ties kept)."""
    top_ks = top_ks.clamp(max=scores.shape[-1])  # [s]
    kth = scores.topk(int(top_ks.max()), dim=-1).values.gather(1, top_ks[:, None] - 1)  # [s, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def _unsort(
    sorted_values: torch.Tensor,  # [s, vocab]
    sorted_ids: torch.Tensor,  # [s, vocab] the vocabulary id at each sorted position
) -> torch.Tensor:  # [s, vocab] in vocabulary order
    # Masking in sorted order and scattering back once is faster than scattering the mask and
    # masked_fill-ing in vocabulary order (CPU).
    return torch.empty_like(sorted_values).scatter_(1, sorted_ids, sorted_values)


def apply_top_p(scores: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:  # [s, vocab]
    """Keep the smallest most-likely set whose probability reaches p (the best token always)."""
    sorted_scores, sorted_ids = scores.sort(dim=-1)  # ascending
    mass_at_or_below = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [s, vocab]
    drop = mass_at_or_below <= (1 - top_ps)[:, None]
    drop[:, -1] = False
    return _unsort(sorted_scores.masked_fill(drop, float("-inf")), sorted_ids)


def apply_typical_p(scores: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:  # [s, vocab]
    """Typical decoding: keep the tokens whose surprise is closest to the entropy, up to mass."""
    logprobs = scores.log_softmax(dim=-1)
    entropy = -(logprobs * logprobs.exp()).nansum(dim=-1, keepdim=True)  # [s, 1]; nan: -inf*0
    distance = (-logprobs - entropy).abs()  # [s, vocab]
    sorted_distance, sorted_ids = distance.sort(dim=-1)
    sorted_scores = scores.gather(1, sorted_ids)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # Index of the last kept token: the first whose cumulative mass reaches the target.
    last = (cumulative < masses[:, None]).sum(dim=-1).clamp(max=scores.shape[-1] - 1)  # [s]
    drop = sorted_distance > sorted_distance.gather(1, last[:, None])
    return _unsort(sorted_scores.masked_fill(drop, float("-inf")), sorted_ids)


def _row_values(
    seqs: list[Sequence], value: Callable[[Sequence], float], like: torch.Tensor
) -> torch.Tensor:  # [s], like's dtype and device
    return torch.tensor([value(seq) for seq in seqs], dtype=like.dtype, device=like.device)


def _watermark(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    return apply_watermark(scores, [seq.last_token_id for seq in seqs])


def _penalize(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    history, is_real = padded_token_ids([seq.token_ids for seq in seqs], scores.device)
    if any(seq.params.applied_repetition_penalty for seq in seqs):
        penalties = _row_values(
            seqs, lambda seq: seq.params.applied_repetition_penalty or 1.0, scores
        )
        scores = apply_repetition_penalty(scores, history, penalties)
    if any(seq.params.frequency_penalty for seq in seqs):
        penalties = _row_values(seqs, lambda seq: seq.params.frequency_penalty or 0.0, scores)
        scores = apply_frequency_penalty(scores, history, is_real, penalties)
    return scores


def _grammar(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    states = [seq.grammar for seq in seqs]
    assert all(state is not None for state in states), "grammar rows hold a grammar state"
    allowed = allowed_tokens(states, scores.shape[-1], scores.device)  # [s, vocab]
    return scores.masked_fill(~allowed, float("-inf"))


def _temperature(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    return scores / _row_values(seqs, lambda seq: seq.params.temperature, scores)[:, None]


def _top_k(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    top_ks = torch.tensor([seq.params.top_k for seq in seqs], device=scores.device)
    return apply_top_k(scores, top_ks)


def _top_p(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    return apply_top_p(scores, _row_values(seqs, lambda seq: seq.params.top_p, scores))


def _typical_p(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    return apply_typical_p(scores, _row_values(seqs, lambda seq: seq.params.typical_p, scores))


# (does a request use this step?, the step on the rows that do), in TGI's order. Penalties and
# watermark apply to greedy requests too; a greedy request has no active warper by definition.
PIPELINE: list[tuple[Callable[[SamplingParams], bool], RowTransform]] = [
    (lambda p: p.watermark, _watermark),
    (lambda p: p.has_penalties, _penalize),
    (lambda p: p.grammar is not None, _grammar),
    (lambda p: p.temperature not in (None, 1.0), _temperature),
    (lambda p: bool(p.top_k), _top_k),
    (lambda p: p.top_p not in (None, 1.0), _top_p),
    (lambda p: p.typical_p not in (None, 1.0), _typical_p),
]


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """[b, vocab] logits -> [b, vocab] float32 scores to sample from (the input is untouched)."""
    scores = logits.float()
    steps = [
        (rows, transform)
        for uses, transform in PIPELINE
        if (rows := [i for i, seq in enumerate(seqs) if uses(seq.params)])
    ]
    if not steps:
        return scores
    scores = scores.clone()  # partial steps write into it
    for rows, transform in steps:
        if len(rows) == len(seqs):
            scores = transform(scores, seqs)
        else:
            index = torch.tensor(rows, device=scores.device)
            scores[index] = transform(scores[index], [seqs[i] for i in rows])
    return scores
