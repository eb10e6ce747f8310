"""Sampler: greedy, warpers, seeds, logprobs and top tokens on hand-made logits (no model)."""

import dataclasses

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.protocol import SamplingParams
from engine.sampling import Sampler, SamplerOutput, top_n_tokens
from engine.sequence import Sequence

VOCAB = 50
GREEDY = SamplingParams(max_new_tokens=1)
PROMPT = [3, 7, 7, 11]


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def make_seqs(params: list[SamplingParams], prompt: list[int] = PROMPT) -> list[Sequence]:
    return [Sequence(f"r{i}", prompt, p, block_size=16) for i, p in enumerate(params)]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None
) -> SamplerOutput:
    return (sampler or Sampler(seed=0))(logits, make_seqs(params))


def test_greedy_is_argmax_with_its_logprob():
    logits = random_logits(4)
    out = sample(logits, [GREEDY] * 4)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_tokens == [()] * 4


def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = random_logits(6)
    params = [
        SamplingParams(max_new_tokens=1, do_sample=True, top_k=1),
        SamplingParams(max_new_tokens=1, do_sample=True, top_p=1e-6),
        SamplingParams(max_new_tokens=1, top_k=1, temperature=0.5),
    ] * 2
    for seed in range(5):
        out = sample(logits, params, Sampler(seed=seed))
        assert torch.equal(out.token_ids, logits.argmax(-1))
        assert torch.equal(out.logprobs, torch.zeros(6))  # the only token left


def test_seeded_request_is_reproducible_whatever_its_batch():
    logits = random_logits(1).expand(3, VOCAB).clone()
    seeded = SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.5, seed=42)
    unseeded = SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.5)
    draws = []
    for batch in ([seeded], [unseeded, seeded, GREEDY]):
        sampler = Sampler()
        row = batch.index(seeded)
        seqs = make_seqs(batch)
        draws.append([sampler(logits[: len(batch)], seqs).token_ids[row].item() for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it does sample, and the generator advances


def test_seeded_request_with_every_processor_is_reproducible_whatever_its_batch():
    logits = (random_logits(1) / 3).expand(3, VOCAB).clone()  # flat enough to leave a choice
    seeded = SamplingParams(
        max_new_tokens=1,
        temperature=1.3,
        top_k=30,
        top_p=0.95,
        typical_p=0.9,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        watermark=True,
        seed=7,
    )
    others = [SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.5), GREEDY]
    draws = []
    for batch in ([seeded], [others[0], seeded, others[1]]):
        sampler = Sampler()
        row = batch.index(seeded)
        seqs = make_seqs(batch)
        draws.append(
            [
                (out.token_ids[row].item(), out.logprobs[row].item())
                for out in (sampler(logits[: len(batch)], seqs) for _ in range(20))
            ]
        )
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_sampling_follows_the_distribution_and_respects_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)])
    params = [SamplingParams(max_new_tokens=1, do_sample=True, top_k=3)]
    sampler = Sampler(seed=0)
    counts = torch.zeros(VOCAB)
    for _ in range(2000):
        counts[sample(logits, params, sampler).token_ids] += 1
    assert counts[3:].sum() == 0  # outside the top 3
    expected = torch.softmax(logits[0, :3], -1) * 2000
    assert torch.allclose(counts[:3], expected, rtol=0.15)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)])
    logits = probs.clamp_min(1e-12).log()
    params = [SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.7)]
    sampler = Sampler(seed=1)
    seen = {sample(logits, params, sampler).token_ids.item() for _ in range(300)}
    assert seen == {0, 1}


def test_logprob_is_that_of_the_warped_distribution():
    # As TGI: temperature, then top-k and top-p masking, then log_softmax.
    logits = random_logits(2)
    params = [SamplingParams(max_new_tokens=1, temperature=0.7, top_k=10, top_p=0.8, seed=s)
              for s in (1, 2)]  # fmt: skip
    out = sample(logits, params)
    warped = logits
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        warped = warper(None, warped)
    expected = torch.log_softmax(warped, -1).gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, expected)
    assert torch.isfinite(warped.gather(1, out.token_ids[:, None])).all()


def test_greedy_request_still_gets_its_repetition_penalty():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 2.0  # a prompt token, best before the penalty
    logits[0, 20] = 1.5
    params = SamplingParams(max_new_tokens=1, repetition_penalty=2.0)
    assert params.is_greedy
    out = sample(logits, [params])
    reference = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([PROMPT]), logits.clone())
    assert out.token_ids.tolist() == [20] == reference.argmax(-1).tolist()
    torch.testing.assert_close(out.logprobs, torch.log_softmax(reference, -1)[:, 20])


def test_top_n_tokens_are_those_of_the_processed_distribution():
    logits = random_logits(3)
    params = [
        SamplingParams(max_new_tokens=1, top_n_tokens=3),
        GREEDY,
        SamplingParams(max_new_tokens=1, top_n_tokens=5, repetition_penalty=1.5),
    ]
    out = sample(logits, params)
    reference = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([PROMPT]), logits[2:].clone())
    for row, n, scores in ((0, 3, logits[0]), (2, 5, reference[0])):
        expected = torch.log_softmax(scores, -1).topk(n)
        assert [token_id for token_id, _ in out.top_tokens[row]] == expected.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([logprob for _, logprob in out.top_tokens[row]]), expected.values
        )
    assert out.top_tokens[1] == ()
    # The greedy pick is the first top token, with the same logprob.
    assert out.top_tokens[0][0] == (out.token_ids[0].item(), out.logprobs[0].item())


def test_top_n_tokens_include_every_tie_and_never_masked_tokens():
    logprobs = torch.log_softmax(
        torch.tensor(
            [
                [3.0, 1.0, 2.0, 2.0, 2.0, 0.0],  # n=2: the best, then three tied at 2.0
                [1.0, 5.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ),
        -1,
    )
    top = top_n_tokens(logprobs, [2, 4, 0])
    assert [token_id for token_id, _ in top[0]] == [0, 2, 3, 4]
    assert [token_id for token_id, _ in top[1]] == [1, 0]  # only two tokens survive
    assert top[2] == ()
    assert top[0][0][1] == logprobs[0, 0].item()


def test_top_n_tokens_with_top_k_only_reports_the_kept_tokens():
    logits = random_logits(1)
    params = SamplingParams(max_new_tokens=1, do_sample=True, top_k=2, top_n_tokens=5, seed=0)
    out = sample(logits, [params])
    assert [token_id for token_id, _ in out.top_tokens[0]] == logits[0].topk(2).indices.tolist()
    assert out.token_ids.item() in logits[0].topk(2).indices.tolist()


def test_sampler_leaves_the_logits_untouched():
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParams(
        max_new_tokens=1, temperature=0.5, top_p=0.9, repetition_penalty=1.2, watermark=True
    )
    sample(logits, [params, dataclasses.replace(params, seed=3)])
    assert torch.equal(logits, before)
