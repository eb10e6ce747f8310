"""Next-token selection for a whole batch at once, with TGI's logprobs and top tokens.

Logits first go through the processors and warpers (engine/logits_processors.py). Greedy rows
then take the argmax; sampling rows draw by inverse CDF with one uniform number per row, taken
from the request's own `torch.Generator` when it has a seed, so a seeded request draws the same
numbers whatever else shares its batch. Logprobs, of the chosen token and of the top tokens,
are those of the processed distribution, as TGI reports them. A batch of greedy rows with no
top tokens needs only each row's top token and its logprob: on CUDA, two small Triton launches
(engine/triton_sampling.py) instead of a log_softmax and an argmax over the whole vocabulary.
"""

from dataclasses import dataclass

import torch

from engine.logits_processors import process_logits
from engine.protocol import SamplingParams
from engine.sequence import Sequence

_HAS_TRITON = torch.cuda.is_available()
if _HAS_TRITON:
    from engine import triton_sampling

TopTokens = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [b] int64
    logprobs: torch.Tensor  # [b] float32, of token_ids under the processed distribution
    top_tokens: list[TopTokens]  # [b]; () for rows with top_n_tokens == 0


class Sampler:
    """Picks one token per row of a logits batch; holds the per-request random generators."""

    def __init__(self, seed: int | None = None) -> None:
        self._generators: dict[str, torch.Generator] = {}  # seeded requests, by request id
        self._shared = torch.Generator()  # unseeded sampling requests share this one
        if seed is None:
            self._shared.seed()
        else:
            self._shared.manual_seed(seed)

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator (no-op if it had none)."""
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return self._generators[request_id]

    def __call__(
        self,
        logits: torch.Tensor,  # [b, vocab]
        seqs: list[Sequence],  # the rows' requests: parameters and token ids so far
    ) -> SamplerOutput:
        scores = process_logits(logits, seqs)  # [b, vocab] float32
        sample_rows = [i for i, seq in enumerate(seqs) if not seq.params.is_greedy]
        top_ns = [seq.params.top_n_tokens for seq in seqs]
        if not sample_rows and not any(top_ns):  # no row needs its whole distribution
            token_ids, chosen_logprobs = argmax_logprob(scores)
            return SamplerOutput(token_ids, chosen_logprobs, [()] * len(seqs))
        logprobs = torch.log_softmax(scores, dim=-1)  # [b, vocab]
        token_ids = scores.argmax(dim=-1)  # [b]
        if sample_rows:
            rows = torch.tensor(sample_rows, device=logits.device)
            uniforms = torch.stack(
                [
                    torch.rand((), generator=self._generator(seqs[i].request_id, seqs[i].params))
                    for i in sample_rows
                ]
            ).to(logits.device)  # [s]
            # softmax, not logprobs.exp(): exp of the masked -inf is slow on CPU.
            token_ids[rows] = sample_inverse_cdf(scores[rows].softmax(dim=-1), uniforms)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=logprobs.gather(1, token_ids[:, None])[:, 0],
            top_tokens=top_n_tokens(logprobs, top_ns),
        )


def argmax_logprob(
    scores: torch.Tensor,  # [b, vocab] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # [b] int64, [b] float32
    """Each row's top token (the first, on a tie) and its log-probability under the row."""
    if _HAS_TRITON and scores.is_cuda:
        return triton_sampling.argmax_logprob(scores.contiguous())
    token_ids = scores.argmax(dim=-1)
    return token_ids, torch.log_softmax(scores, dim=-1).gather(1, token_ids[:, None])[:, 0]


def sample_inverse_cdf(
    probs: torch.Tensor,  # [s, vocab], masked tokens exactly 0
    uniforms: torch.Tensor,  # [s] in [0, 1)
) -> torch.Tensor:  # [s] sampled token ids
    """Draw one token per row: the first whose cumulative probability reaches (1 - u) * total."""
    cdf = probs.cumsum(dim=-1)  # [s, vocab], non-decreasing
    # (1 - u) lies in (0, 1], so the target is above 0 and never lands on a zero-probability
    # token (its cdf equals its predecessor's, which is already below the target).
    targets = (1.0 - uniforms.to(cdf.dtype))[:, None] * cdf[:, -1:]  # [s, 1]
    picks = torch.searchsorted(cdf, targets).clamp_(max=probs.shape[-1] - 1)  # [s, 1]
    return picks[:, 0]


def top_n_tokens(
    logprobs: torch.Tensor,  # [b, vocab]
    top_ns: list[int],  # [b], 0: none
) -> list[TopTokens]:  # [b]
    """Each row's n most likely tokens as TGI's batch_top_tokens picks them.

    Every token tied with the n-th logprob is included (so a row may get more than n), and
    tokens the warpers masked (-inf) never are (so a row may get fewer). Ties are listed by id.
    """
    top_tokens: list[TopTokens] = [()] * len(top_ns)
    rows = [i for i, n in enumerate(top_ns) if n > 0]
    if not rows:
        return top_tokens
    row_logprobs = logprobs[torch.tensor(rows, device=logprobs.device)]  # [t, vocab]
    ns = torch.tensor([top_ns[i] for i in rows], device=logprobs.device).clamp(
        max=logprobs.shape[-1]
    )  # [t]
    top = row_logprobs.topk(int(ns.max()), dim=-1)  # sorted, [t, max_n]
    nth = top.values.gather(1, ns[:, None] - 1)  # [t, 1]
    nth = nth.clamp(min=torch.finfo(nth.dtype).min)  # -inf is never reported
    counts = (row_logprobs >= nth).sum(dim=-1)  # [t]
    if int(counts.max()) > top.values.shape[-1]:  # ties past the largest n
        top = row_logprobs.topk(int(counts.max()), dim=-1)
    # topk's order among equal values is unspecified; the first `count` entries of each row
    # are exactly its tokens >= nth, which we then order deterministically.
    for row, count, ids, values in zip(
        rows, counts.tolist(), top.indices.tolist(), top.values.tolist(), strict=True
    ):
        pairs = zip(ids[:count], values[:count], strict=True)
        top_tokens[row] = tuple(sorted(pairs, key=lambda pair: (-pair[1], pair[0])))
    return top_tokens
