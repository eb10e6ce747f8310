"""Benchmark workloads are seeded and exact: same seed, same requests, exact token lengths."""

import random

import pytest
from transformers import AutoTokenizer

from benchmarks.workload import LengthDist, make_requests


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("fixed:7", 7, 7), ("uniform:3:9", 3, 9), ("chat:50:300", 4, 300)],
)
def test_length_distributions_stay_in_range(spec, low, high):
    dist = LengthDist.parse(spec)
    rng = random.Random(0)
    samples = [dist.sample(rng) for _ in range(2000)]
    assert low <= min(samples) and max(samples) <= high
    assert str(dist) == spec


def test_chat_lengths_are_long_tailed():
    rng = random.Random(0)
    samples = sorted(LengthDist.parse("chat:50:10000").sample(rng) for _ in range(4000))
    median, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
    assert 40 <= median <= 60
    assert p99 > 4 * median


@pytest.mark.parametrize("spec", ["fixed", "fixed:0", "uniform:9:3", "normal:3:4", "chat:x:9"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="bad length spec"):
        LengthDist.parse(spec)


def test_prompts_have_the_sampled_token_length_and_repeat_with_the_seed(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    dists = LengthDist.parse("uniform:5:200"), LengthDist.parse("uniform:1:50")
    requests = make_requests(tokenizer, 20, *dists, seed=3)
    assert requests == make_requests(tokenizer, 20, *dists, seed=3)
    assert requests != make_requests(tokenizer, 20, *dists, seed=4)
    for req in requests:
        assert 5 <= req.num_prompt_tokens <= 200 and 1 <= req.max_new_tokens <= 50
        num_tokens = len(tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
        assert num_tokens == req.num_prompt_tokens
