"""Logits processors against direct references: transformers' own processors where HF defines
them, the TGI formulas written out plainly where it does not (no model)."""

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.logits_processors import (
    WATERMARK_DELTA,
    apply_frequency_penalty,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    apply_watermark,
    padded_token_ids,
    process_logits,
    watermark_greenlist,
)
from engine.protocol import SamplingParams
from engine.sequence import Sequence

VOCAB = 64
HISTORIES = [[1, 5, 5, 9, 63, 0], [2, 2, 2, 2], [40, 41, 42, 43, 44, 45, 46, 47, 1, 1]]


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def make_seqs(params: list[SamplingParams], histories=HISTORIES) -> list[Sequence]:
    return [
        Sequence(f"r{i}", ids, p, block_size=16)
        for i, (p, ids) in enumerate(zip(params, histories, strict=True))
    ]


def hf_repetition(logits: torch.Tensor, penalty: float, history: list[int]) -> torch.Tensor:
    return RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits[None])[0]


def tgi_frequency(logits: torch.Tensor, penalty: float, history: list[int]) -> torch.Tensor:
    expected = logits.clone()
    for token_id, count in Counter(history).items():
        expected[token_id] -= penalty * count / len(history)
    return expected


def test_padded_token_ids_pad_each_row_with_its_own_first_id():
    history, is_real = padded_token_ids(HISTORIES, torch.device("cpu"))
    assert history.shape == is_real.shape == (3, 10)
    for row, ids in enumerate(HISTORIES):
        assert history[row].tolist() == ids + [ids[0]] * (10 - len(ids))
        assert is_real[row].tolist() == [True] * len(ids) + [False] * (10 - len(ids))


def test_repetition_penalty_matches_transformers_per_row():
    logits = random_logits(3)
    penalties = [1.3, 0.7, 2.0]  # < 1 rewards repetition
    history, _ = padded_token_ids(HISTORIES, torch.device("cpu"))
    out = apply_repetition_penalty(logits, history, torch.tensor(penalties))
    for row, (penalty, ids) in enumerate(zip(penalties, HISTORIES, strict=True)):
        assert torch.equal(out[row], hf_repetition(logits[row], penalty, ids))
    assert not torch.equal(out, logits)


def test_frequency_penalty_is_tgis_length_normalised_count():
    logits = random_logits(3)
    penalties = [0.5, -1.0, 1.5]
    history, is_real = padded_token_ids(HISTORIES, torch.device("cpu"))
    out = apply_frequency_penalty(logits, history, is_real, torch.tensor(penalties))
    for row, (penalty, ids) in enumerate(zip(penalties, HISTORIES, strict=True)):
        torch.testing.assert_close(out[row], tgi_frequency(logits[row], penalty, ids))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_matches_transformers(mass):
    logits = random_logits(4, seed=1)
    logits[1, :10] = float("-inf")  # rows already masked by an earlier warper still work
    out = apply_typical_p(logits, torch.full((4,), mass))
    expected = TypicalLogitsWarper(mass=mass)(None, logits.clone())
    assert torch.equal(out.isinf(), expected.isinf())
    assert torch.equal(out[~out.isinf()], logits[~out.isinf()])


def test_typical_p_with_a_different_mass_per_row():
    logits = random_logits(3, seed=2)
    masses = [0.3, 0.95, 0.6]
    out = apply_typical_p(logits, torch.tensor(masses))
    for row, mass in enumerate(masses):
        expected = TypicalLogitsWarper(mass=mass)(None, logits[row : row + 1].clone())
        assert torch.equal(out[row : row + 1], expected)


def test_top_k_and_top_p_match_transformers_per_row():
    logits = random_logits(3, seed=3)
    logits[0, 5] = logits[0, 6] = logits[0].max() + 1  # a tie at the k-th score: both kept
    top_ks, top_ps = [2, 7, 64], [0.3, 0.8, 0.999]
    out_k = apply_top_k(logits, torch.tensor(top_ks))
    out_p = apply_top_p(logits, torch.tensor(top_ps))
    for row in range(3):
        row_logits = logits[row : row + 1]
        assert torch.equal(out_k[row : row + 1], TopKLogitsWarper(top_ks[row])(None, row_logits))
        assert torch.equal(out_p[row : row + 1], TopPLogitsWarper(top_ps[row])(None, row_logits))
    assert out_k[0].isfinite().sum() == 2


def test_watermark_adds_delta_to_half_the_vocab_seeded_by_the_previous_token():
    logits = random_logits(3)
    out = apply_watermark(logits, [17, 17, 18])
    bias = out - logits  # [3, vocab]
    for row, previous in enumerate([17, 17, 18]):
        # TGI's WatermarkLogitsProcessor: randperm seeded with hash_key * previous token.
        generator = torch.Generator().manual_seed(15485863 * previous)
        green = torch.randperm(VOCAB, generator=generator)[: VOCAB // 2]
        expected = torch.zeros(VOCAB)
        expected[green] = WATERMARK_DELTA
        torch.testing.assert_close(bias[row], expected)
    green = bias > WATERMARK_DELTA / 2  # [3, vocab]
    assert torch.equal(green[0], green[1])
    assert not torch.equal(green[0], green[2])
    assert len(watermark_greenlist(18, VOCAB)) == VOCAB // 2


def test_presence_penalty_is_tgis_repetition_penalty_plus_two():
    assert SamplingParams(max_new_tokens=1, presence_penalty=0.5).applied_repetition_penalty == 2.5
    assert (
        SamplingParams(max_new_tokens=1, presence_penalty=-1.0).applied_repetition_penalty is None
    )
    assert (
        SamplingParams(max_new_tokens=1, repetition_penalty=1.0).applied_repetition_penalty is None
    )
    with pytest.raises(ValueError, match="both"):
        SamplingParams(max_new_tokens=1, repetition_penalty=1.2, presence_penalty=0.1)
    logits = random_logits(1)
    [seq] = make_seqs([SamplingParams(max_new_tokens=1, presence_penalty=0.5)], HISTORIES[:1])
    expected = hf_repetition(logits[0], 2.5, HISTORIES[0])
    torch.testing.assert_close(process_logits(logits, [seq])[0], expected)


def test_typical_p_turns_sampling_on():
    assert not SamplingParams(max_new_tokens=1, typical_p=0.9).is_greedy
    assert SamplingParams(max_new_tokens=1, typical_p=1.0).is_greedy
    assert SamplingParams(max_new_tokens=1, repetition_penalty=1.2, watermark=True).is_greedy


def test_process_logits_chains_in_tgis_order_and_only_on_the_rows_that_ask():
    logits = random_logits(3, seed=4)
    everything = SamplingParams(
        max_new_tokens=1,
        watermark=True,
        repetition_penalty=1.4,
        frequency_penalty=0.8,
        temperature=0.6,
        top_k=20,
        top_p=0.9,
        typical_p=0.8,
    )
    plain = SamplingParams(max_new_tokens=1)
    freq_only = SamplingParams(max_new_tokens=1, frequency_penalty=2.0)
    seqs = make_seqs([everything, plain, freq_only])
    before = logits.clone()
    out = process_logits(logits, seqs)
    assert torch.equal(logits, before)

    history = HISTORIES[0]
    expected = apply_watermark(logits[:1], [history[-1]])[0]
    expected = hf_repetition(expected, 1.4, history)
    expected = tgi_frequency(expected, 0.8, history)[None]
    for warper in (
        TemperatureLogitsWarper(0.6),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
        TypicalLogitsWarper(0.8),
    ):
        expected = warper(None, expected)
    torch.testing.assert_close(out[0], expected[0])
    assert torch.equal(out[1], logits[1])
    torch.testing.assert_close(out[2], tgi_frequency(logits[2], 2.0, HISTORIES[2]))


def test_process_logits_is_a_no_op_for_plain_requests():
    logits = random_logits(2)
    greedy = SamplingParams(max_new_tokens=1)
    sampling = SamplingParams(max_new_tokens=1, do_sample=True, seed=1, top_n_tokens=3)
    out = process_logits(logits, make_seqs([greedy, sampling], HISTORIES[:2]))
    assert out is logits  # nothing copied, nothing computed
