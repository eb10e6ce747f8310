"""The routing simulation: its clock, its workload and its three routers, on the real
Scheduler and the real router ranking."""

import pytest

from benchmarks.routing_sim import (
    ROUTERS,
    BatchingAware,
    PowerOfTwo,
    SimEngine,
    SimRequest,
    Timing,
    poisson_workload,
    simulate,
    summarize_ratios,
)

TIMING = Timing()


def test_a_lone_request_waits_for_its_hop_its_prefill_and_serve():
    request = SimRequest("r0", arrival_s=1.0, num_prompt_tokens=100, max_new_tokens=4)
    for router in ROUTERS:
        (ttft,) = simulate([request], router, 1280, TIMING, report_period_s=0.5, seed=0)
        prefill = TIMING.step_s + 100 * TIMING.prefill_s_per_token
        assert ttft == pytest.approx(TIMING.hop_s + prefill + TIMING.serve_overhead_s)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_request_of_a_loaded_workload_gets_its_first_token(router):
    requests = poisson_workload(60, rate=40, long_share=0.5, seed=3)
    ttfts = simulate(requests, router, 1280, TIMING, report_period_s=0.5, seed=3)
    assert len(ttfts) == 60
    least = TIMING.hop_s + TIMING.step_s + TIMING.serve_overhead_s
    assert min(ttfts) >= least
    assert max(ttfts) > 1.0  # 30 long generations at once for two 1280-token caches: a queue


def test_the_workload_is_seeded_and_mixes_short_and_long():
    requests = poisson_workload(100, rate=5, long_share=0.25, seed=1)
    assert requests == poisson_workload(100, rate=5, long_share=0.25, seed=1)
    assert requests != poisson_workload(100, rate=5, long_share=0.25, seed=2)
    assert sum(r.max_new_tokens == 512 for r in requests) == 25
    assert all(32 <= r.num_prompt_tokens <= 128 for r in requests)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 40  # ~100 / 5 per s


def test_the_default_rule_sends_to_the_replica_with_fewer_ongoing_requests():
    router = PowerOfTwo(seed=0)
    request = SimRequest("r", 0.0, 50, 16)
    first = router.choose(request, 0.0)
    assert router.choose(request, 0.0) == 1 - first  # the other one now has fewer
    router.finished("r", first, 1.0)
    assert router.choose(request, 1.0) == first


def test_batching_aware_sends_a_request_away_from_a_full_kv_cache_however_few_requests():
    full, busy = SimEngine(kv_tokens=1280), SimEngine(kv_tokens=1280)
    full.add(SimRequest("long", 0.0, 1200, 64))  # one request, 75 blocks
    for i in range(3):
        busy.add(SimRequest(f"short{i}", 0.0, 40, 16))
    for engine in (full, busy):
        engine.step(0.0, TIMING)
    router = BatchingAware(seed=0)
    router.report([full, busy], now=0.1)
    assert router.choose(SimRequest("new", 0.1, 100, 16), now=0.1) == 1


def test_a_request_may_end_at_an_eos_before_its_budget():
    engine = SimEngine(kv_tokens=1280)
    engine.add(SimRequest("early", 0.0, 40, max_new_tokens=16, num_new_tokens=3))
    now, num_steps = 0.0, 0
    while engine.scheduler.has_unfinished_seqs():
        now, _ = engine.step(now, TIMING)
        num_steps += 1
    assert num_steps == 3  # the prefill's token and two decode steps


def test_ratios_count_only_runs_where_the_default_shows_a_tail():
    def row(default_p50, default_p99, ours_p99, oracle_p99):
        return {"ttft_p50_ms": {"power_of_two": default_p50},
                "ttft_p99_ms": {"power_of_two": default_p99, "batching_aware": ours_p99,
                                "oracle": oracle_p99}}  # fmt: skip

    summary = summarize_ratios(
        [row(30, 40, 20, 20), row(30, 300, 100, 400), row(30, 600, 200, 200)]
    )
    assert summary["runs_with_a_tail"] == 2
    ours = summary["batching_aware"]
    assert ours["median_default_over_router"] == 3.0  # 300/100 and 600/200
    assert ours["runs_at_2x_or_more"] == 2 and ours["runs_worse_than_default"] == 0
    assert summary["oracle"]["runs_worse_than_default"] == 1
