"""Next-token selection for a whole batch at once: greedy, temperature, top-k, top-p, seeds.

Greedy rows take the argmax. Sampling rows are warped in sorted order (temperature, then
top-k, then top-p, as transformers and TGI do) and drawn by inverse CDF with one uniform number
per row, taken from the request's own `torch.Generator` when it has a seed, so a seeded
request draws the same numbers whatever else shares its batch.
"""

import torch

from engine.protocol import SamplingParams


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
        request_ids: list[str],
        params: list[SamplingParams],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # token ids [b] int64, logprobs [b] float32
        logits = logits.float()
        sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sample_rows:
            temperatures = [(p.temperature or 1.0) for p in params]
            logits = logits / torch.tensor(temperatures, device=logits.device)[:, None]
        token_ids = logits.argmax(dim=-1)  # [b]
        if sample_rows:
            rows = torch.tensor(sample_rows, device=logits.device)
            uniforms = torch.stack(
                [
                    torch.rand((), generator=self._generator(request_ids[i], params[i]))
                    for i in sample_rows
                ]
            ).to(logits.device)  # [s]
            top_ks = [params[i].top_k or 0 for i in sample_rows]
            top_ps = [params[i].top_p or 1.0 for i in sample_rows]
            sampled = sample_top_k_top_p(logits[rows], top_ks, top_ps, uniforms)
            token_ids[rows] = sampled
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, token_ids[:, None])[:, 0]
        return token_ids, logprobs


def sample_top_k_top_p(
    logits: torch.Tensor,  # [s, vocab], temperature already applied
    top_ks: list[int],  # 0: no top-k
    top_ps: list[float],  # 1.0: no top-p
    uniforms: torch.Tensor,  # [s] in [0, 1)
) -> torch.Tensor:  # [s] sampled token ids
    """Draw one token per row from the top-k / top-p filtered softmax, by inverse CDF."""
    s, vocab = logits.shape
    device = logits.device
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [s, vocab]
    ranks = torch.arange(vocab, device=device)[None]  # [1, vocab]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
    sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [s, vocab]
    # Top-p keeps a token while the mass ranked strictly above it is below p (transformers'
    # rule); the most likely token is always kept.
    ps = torch.tensor(top_ps, device=device, dtype=probs.dtype)
    mass_above = probs.cumsum(dim=-1) - probs
    drop = (mass_above >= ps[:, None]) & (ranks > 0) & (ps[:, None] < 1.0)
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)  # [s, vocab], unnormalised
    # (1 - u) lies in (0, 1], so the draw never lands on a zero-probability token.
    targets = (1.0 - uniforms.to(cdf.dtype))[:, None] * cdf[:, -1:]  # [s, 1]
    picks = torch.searchsorted(cdf, targets).clamp_(max=vocab - 1)  # [s, 1] sorted positions
    return sorted_ids.gather(1, picks)[:, 0]
