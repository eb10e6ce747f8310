"""Sampler: greedy, warpers, seeds and logprobs on hand-made logits (no model)."""

import torch

from engine.protocol import SamplingParams
from engine.sampling import Sampler

VOCAB = 50
GREEDY = SamplingParams(max_new_tokens=1)


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None):
    sampler = sampler or Sampler(seed=0)
    ids = [f"r{i}" for i in range(len(params))]
    return sampler(logits, ids, params)


def test_greedy_is_argmax_with_its_logprob():
    logits = random_logits(4)
    token_ids, logprobs = sample(logits, [GREEDY] * 4)
    assert torch.equal(token_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, token_ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = random_logits(6)
    params = [
        SamplingParams(max_new_tokens=1, do_sample=True, top_k=1),
        SamplingParams(max_new_tokens=1, do_sample=True, top_p=1e-6),
        SamplingParams(max_new_tokens=1, top_k=1, temperature=0.5),
    ] * 2
    for seed in range(5):
        token_ids, _ = sample(logits, params, Sampler(seed=seed))
        assert torch.equal(token_ids, logits.argmax(-1))


def test_seeded_request_is_reproducible_whatever_its_batch():
    logits = random_logits(1).expand(3, VOCAB).clone()
    seeded = SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.5, seed=42)
    unseeded = SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.5)
    draws = []
    for batch in ([seeded], [unseeded, seeded, GREEDY]):
        sampler = Sampler()
        row = batch.index(seeded)
        ids = [f"r{i}" for i in range(len(batch))]
        draws.append([sampler(logits[: len(batch)], ids, batch)[0][row].item() for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it does sample, and the generator advances


def test_sampling_follows_the_distribution_and_respects_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)])
    params = [SamplingParams(max_new_tokens=1, do_sample=True, top_k=3)]
    sampler = Sampler(seed=0)
    counts = torch.zeros(VOCAB)
    for _ in range(2000):
        counts[sample(logits, params, sampler)[0]] += 1
    assert counts[3:].sum() == 0  # outside the top 3
    expected = torch.softmax(logits[0, :3], -1) * 2000
    assert torch.allclose(counts[:3], expected, rtol=0.15)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)])
    logits = probs.clamp_min(1e-12).log()
    params = [SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.7)]
    sampler = Sampler(seed=1)
    seen = {sample(logits, params, sampler)[0].item() for _ in range(300)}
    assert seen == {0, 1}


def test_logprob_is_taken_after_temperature():
    logits = random_logits(1)
    params = [SamplingParams(max_new_tokens=1, temperature=0.5, top_k=1)]
    token_ids, logprobs = sample(logits, params)
    expected = torch.log_softmax(logits / 0.5, -1)[0, token_ids[0]]
    torch.testing.assert_close(logprobs[0], expected)
