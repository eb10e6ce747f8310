"""The routing benchmark's workloads are seeded and shaped as it says (its end-to-end run is
tests/integration/test_routing_autoscaling.py's, which shares its helpers)."""

import pytest
from transformers import AutoTokenizer

from benchmarks.routing import prefix_workload, router_ratios, skewed_requests
from benchmarks.workload import LengthDist


def test_skewed_requests_mix_short_and_long_generations_by_seed(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)

    def make(seed: int):
        return skewed_requests(tokenizer, 200, LengthDist.parse("uniform:8:16"), 16, 512, 0.25,
                               seed)  # fmt: skip

    requests = make(0)
    assert requests == make(0) and requests != make(1)
    assert {r.max_new_tokens for r in requests} == {16, 512}
    assert 30 <= sum(r.max_new_tokens == 512 for r in requests) <= 70  # 25 % of 200, seeded


def test_prefix_workload_repeats_each_system_prompt_after_all_others():
    prompts = prefix_workload(num_system_prompts=4, num_questions=3, system_words=50)
    systems = [p.split("\n")[0] for p in prompts]
    assert len(set(systems)) == 4 and systems[:4] == systems[4:8] == systems[8:]
    assert len(set(prompts)) == 12
    assert all(len(s) >= 64 for s in systems)  # long enough for the router's prefix keys


def test_ratios_are_the_default_routers_latency_over_ours():
    def summary(ttft: float, e2e: float) -> dict:
        return {"ttft_ms": {"p50": ttft, "p99": 2 * ttft}, "e2e_ms": {"p50": e2e, "p99": e2e}}

    ratios = router_ratios({"batching_aware": summary(100, 1000),
                            "power_of_two": summary(300, 1500)})  # fmt: skip
    assert ratios["ttft_ms_p99_default_over_ours"] == pytest.approx(3.0)
    assert ratios["e2e_ms_p50_default_over_ours"] == pytest.approx(1.5)
