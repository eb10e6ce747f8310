"""The Triton greedy pick against torch's argmax and log_softmax (GPU only)."""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("vocab", [100, 4096, 49152, 128256])
def test_top_token_and_logprob_match_torch(vocab):
    from engine.triton_sampling import argmax_logprob

    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = 5 * torch.randn(4, vocab, device="cuda", generator=gen)
    scores[0, 7] = scores[0].max() + 1
    scores[0, vocab - 1] = scores[0, 7]  # a tie across chunks: the first wins, as torch's
    scores[1, : vocab // 2] = float("-inf")  # masked chunks (a grammar's mask)
    scores[2] = float("-inf")
    scores[2, vocab // 3] = 0.5  # one allowed token: logprob 0
    token_ids, logprobs = argmax_logprob(scores)
    expected = scores.argmax(dim=-1)
    assert token_ids.tolist() == expected.tolist()
    assert token_ids[0] == 7 and logprobs[2] == 0
    expected_logprobs = scores.log_softmax(dim=-1).gather(1, expected[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)


@cuda
def test_sampler_takes_the_greedy_pick_on_cuda():
    from engine.protocol import SamplingParams
    from engine.sampling import Sampler
    from engine.sequence import Sequence

    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(3, 1000, device="cuda", generator=gen)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_new_tokens=4), 16) for i in range(3)]
    out = Sampler(seed=0)(logits, seqs)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    expected = logits.float().log_softmax(dim=-1).max(dim=-1).values
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=1e-5)
    assert out.top_tokens == [(), (), ()]
