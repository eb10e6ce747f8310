"""What choosing a replica can do for TTFT p99: routers compared in simulated time.

Two real engine `Scheduler`s (engine/scheduler.py: admission rule, paged KV blocks,
preemption) are stepped through the same seeded Poisson workload as benchmarks.routing
(16- and 512-token generations mixed, prompts of 32-128 tokens), with a step-time model in
place of the model's forward pass. Each request is routed at its arrival by one of:
  - power_of_two: Serve's default router with two replicas: fewer ongoing requests wins,
    ties at random;
  - batching_aware: deployments/router.py's ranking (`replica_loads`, `rank_replicas`) on
    EngineLoad reports taken every --report-period-s, corrected by an InFlightLedger of the
    requests sent and finished since, then by the first-token forecast from the scheduler
    snapshots sent with those reports (`rank_by_first_token`), as TGIRequestRouter does
    in Serve;
  - oracle: knows both engines exactly and sends the request where it gets its first token
    soonest (a copy of each engine stepped forward with the request added; later arrivals
    unknown): a greedy router with perfect, instant knowledge, which no router reading
    reports can match request by request (greedy, so not the best possible at p99).
A real run of benchmarks.routing takes minutes per configuration and its p99 is the worst
few of a few hundred requests; here a grid of configurations x seeds takes a minute.
What routers cannot know can be made to differ from what they forecast: each step's time
drawn around the model's (--step-jitter, a lognormal sigma), and a share of the requests
ending early at an EOS (--early-stop-share), which no router knows in advance.

    python -m benchmarks.routing_sim [--kv 1280 2048 --long-share 0.2 0.35 0.5 --rate 6 10]
"""

import argparse
import copy
import dataclasses
import heapq
import itertools
import json
import random
import statistics
import sys
import zlib
from collections.abc import Hashable
from dataclasses import dataclass

from benchmarks.common import RESULTS_DIR, machine
from benchmarks.report import percentiles
from deployments.engine_load import EngineLoad
from deployments.first_token_forecast import rank_by_first_token
from deployments.router import TGI_WAITING_SERVED_RATIO, rank_replicas, replica_loads
from deployments.routing_state import InFlightLedger
from engine.config import EngineConfig
from engine.forecast import SchedulerSnapshot, StepTimes, num_step_tokens, take_snapshot
from engine.llm_engine import scheduler_stats
from engine.protocol import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

ROUTERS = ("power_of_two", "batching_aware", "oracle")
NUM_REPLICAS = 2
EOS = 2
FORECAST_MAX_SEQ_STEPS = 20_000  # TGIRequestRouter's default


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_new_tokens: int
    num_new_tokens: int | None = None  # what it generates, ending at an EOS; None: all

    def sequence(self) -> Sequence:
        # Distinct prompts (no prefix-cache hits), the same in every run.
        offset = zlib.crc32(self.request_id.encode())
        prompt_ids = [3 + (offset + i) % 40_000 for i in range(self.num_prompt_tokens)]
        params = SamplingParams(self.max_new_tokens, eos_token_ids=frozenset({EOS}))
        return Sequence(self.request_id, prompt_ids, params, 16)


@dataclass(frozen=True)
class Timing:
    """Seconds per engine step and per hop. Defaults: the H200 host's routing runs (four
    engines sharing the GPU: inter-token p50 4.6 ms); Serve's own share of a first token
    there (+12.68 ms at one stream) is added to every TTFT."""

    step_s: float = 0.004
    decode_s_per_seq: float = 0.00003
    prefill_s_per_token: float = 0.00001
    hop_s: float = 0.005  # routed -> in the engine's queue
    serve_overhead_s: float = 0.013
    jitter: float = 0.0  # sigma of the lognormal factor each step's time is drawn with

    def step(self, seqs: list[Sequence], is_prefill: bool, rng: random.Random) -> float:
        if is_prefill:
            seconds = self.step_s + self.prefill_s_per_token * sum(s.prefill_chunk for s in seqs)
        else:
            seconds = self.step_s + self.decode_s_per_seq * len(seqs)
        return seconds * rng.lognormvariate(0.0, self.jitter) if self.jitter else seconds


class SimEngine:
    """One replica's engine: a real Scheduler, busy until its current step ends."""

    def __init__(self, kv_tokens: int, seed: int = 0) -> None:
        config = EngineConfig(model_dir="unused", max_batch_total_tokens=kv_tokens,
                              max_batch_prefill_tokens=1024)  # fmt: skip
        self.kv_tokens = kv_tokens
        self.scheduler = Scheduler(config)
        self.busy_until = 0.0
        self.step_times = StepTimes()  # measured as the engine measures its own
        self.num_new_tokens: dict[str, int] = {}  # by request id: when it ends
        self._rng = random.Random(seed)

    def add(self, request: SimRequest) -> None:
        self.num_new_tokens[request.request_id] = request.num_new_tokens or request.max_new_tokens
        self.scheduler.add(request.sequence())

    def step(self, now: float, timing: Timing) -> tuple[float, list[Sequence]]:
        """Run one step from `now` (there must be work): (its end, the sequences that got
        a token). The scheduler moves to the step's outcome at once; its tokens count from
        the step's end (a report taken meanwhile is up to one step early)."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:  # the Scheduler always has a step for unfinished sequences
            raise RuntimeError("the scheduler has sequences but no step")
        seconds = timing.step(seqs, is_prefill, self._rng)
        self.step_times.observe(is_prefill, num_step_tokens(seqs, is_prefill), seconds)
        if is_prefill:
            seqs = self.scheduler.finish_prefill(seqs)
        last = [s.num_completion_tokens + 1 >= self.num_new_tokens[s.request_id] for s in seqs]
        self.scheduler.postprocess(seqs, [EOS if end else 7 for end in last])
        self.busy_until = now + seconds
        return self.busy_until, seqs

    def load(self, now: float) -> tuple[EngineLoad, SchedulerSnapshot]:
        """What its /metrics and /scheduler would report now."""
        stats = scheduler_stats(self.scheduler, self.kv_tokens)
        load = EngineLoad(
            num_queued=stats.num_waiting, num_running=stats.num_running,
            num_batch_max_tokens=stats.num_batch_max_tokens, reported_at=now,
            max_batch_total_tokens=stats.max_batch_total_tokens,
            num_free_blocks=stats.num_free_blocks, num_total_blocks=stats.num_total_blocks,
        )  # fmt: skip
        # The engine takes it between two steps: at the end of the one running now.
        snapshot = take_snapshot(self.scheduler, self.step_times)
        return load, dataclasses.replace(snapshot, taken_at=max(self.busy_until, now))


class PowerOfTwo:
    """Serve's default with two replicas: both are the sampled pair; fewer ongoing wins."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._ongoing = [0] * NUM_REPLICAS

    def choose(self, request: SimRequest, now: float) -> int:
        fewest = min(self._ongoing)
        choice = self._rng.choice([r for r, n in enumerate(self._ongoing) if n == fewest])
        self._ongoing[choice] += 1
        return choice

    def finished(self, request_id: str, replica: int, now: float) -> None:
        self._ongoing[replica] -= 1

    def report(self, engines: list[SimEngine], now: float) -> None:
        pass


class BatchingAware:
    """TGIRequestRouter's choice on periodic reports plus its in-flight ledger."""

    def __init__(self, seed: int) -> None:
        random.seed(seed)  # rank_replicas breaks ties with the random module
        self._ledger = InFlightLedger(reservation_ttl_s=5.0)
        self._reports: dict[Hashable, EngineLoad | None] = dict.fromkeys(range(NUM_REPLICAS))
        self._snapshots: dict[Hashable, SchedulerSnapshot | None] = {}

    def choose(self, request: SimRequest, now: float) -> int:
        reported_at = {r: load.reported_at if load else None for r, load in self._reports.items()}
        num_tokens = request.num_prompt_tokens + request.max_new_tokens
        # 256 and 16,384: TGIRequestRouter's defaults for requests and capacities not reported.
        loads = replica_loads(
            self._reports, self._ledger.unreported(reported_at, now), num_tokens,
            request.max_new_tokens, 256, 16_384, TGI_WAITING_SERVED_RATIO,
        )  # fmt: skip
        ranked = rank_replicas(loads, preferred=None, affinity_slack=0.1)
        sent_since = {r: self._ledger.sent_since(r, s.taken_at)
                      for r, s in self._snapshots.items() if s}  # fmt: skip
        request_tokens = (request.num_prompt_tokens, request.max_new_tokens)
        ranked = rank_by_first_token(ranked, self._snapshots, sent_since, request_tokens, now,
                                     FORECAST_MAX_SEQ_STEPS)  # fmt: skip
        self._ledger.confirm(request.request_id, ranked[0], num_tokens, now,
                             request.max_new_tokens)  # fmt: skip
        return ranked[0]

    def finished(self, request_id: str, replica: int, now: float) -> None:
        self._ledger.finish(request_id, now)

    def report(self, engines: list[SimEngine], now: float) -> None:
        reports = {r: engine.load(now) for r, engine in enumerate(engines)}
        self._reports = {r: load for r, (load, _) in reports.items()}
        self._snapshots = {r: snapshot for r, (_, snapshot) in reports.items()}


class Oracle:
    """Sends each request where a copy of the engine, stepped forward, gives it its first
    token soonest (requests already on their way included; later arrivals unknown)."""

    def __init__(self, seed: int, engines: list[SimEngine], in_transit: list, timing: Timing):
        self._rng = random.Random(seed)
        self._engines, self._in_transit, self._timing = engines, in_transit, timing

    def choose(self, request: SimRequest, now: float) -> int:
        soonest = {r: self._first_token_s(r, request, now) for r in range(NUM_REPLICAS)}
        return min(soonest, key=lambda r: (soonest[r], self._rng.random()))

    def _first_token_s(self, replica: int, request: SimRequest, now: float) -> float:
        engine = copy.deepcopy(self._engines[replica])
        arrivals = sorted((t, req) for t, _, r, req in self._in_transit if r == replica)
        arrivals.append((now + self._timing.hop_s, request))
        t = max(engine.busy_until, now)
        while True:
            while arrivals and arrivals[0][0] <= t:
                engine.add(arrivals.pop(0)[1])
            if not engine.scheduler.has_unfinished_seqs():
                t = arrivals[0][0]
                continue
            t, seqs = engine.step(t, self._timing)
            if any(seq.request_id == request.request_id for seq in seqs):
                return t

    def finished(self, request_id: str, replica: int, now: float) -> None:
        pass

    def report(self, engines: list[SimEngine], now: float) -> None:
        pass


def poisson_workload(
    num_requests: int, rate: float, long_share: float, seed: int,
    short_tokens: int = 16, long_tokens: int = 512, early_stop_share: float = 0.0,
) -> list[SimRequest]:  # fmt: skip
    """benchmarks.routing's skewed workload: prompts of 32-128 tokens, `long_share` of the
    requests (at seeded positions) allowed `long_tokens`, the rest `short_tokens`; each
    ends at an EOS after a quarter to all of them with probability `early_stop_share`."""
    rng = random.Random(seed)
    long_ids = set(rng.sample(range(num_requests), round(long_share * num_requests)))
    ends = random.Random(seed + 1)  # the same arrivals and lengths whatever the share
    arrival = 0.0
    requests = []
    for i in range(num_requests):
        arrival += rng.expovariate(rate)
        max_new = long_tokens if i in long_ids else short_tokens
        early = ends.random() < early_stop_share
        num_new = ends.randint(max(max_new // 4, 1), max_new) if early else max_new
        requests.append(SimRequest(f"r{i}", arrival, rng.randint(32, 128), max_new, num_new))
    return requests


def simulate(requests: list[SimRequest], router_name: str, kv_tokens: int, timing: Timing,
             report_period_s: float, seed: int) -> list[float]:  # fmt: skip
    """Every request's TTFT in seconds, in arrival order."""
    engines = [SimEngine(kv_tokens, seed * NUM_REPLICAS + r) for r in range(NUM_REPLICAS)]
    in_transit: list = []  # heap of (reaches the engine at, tie-break, replica, request)
    if router_name == "oracle":
        router = Oracle(seed, engines, in_transit, timing)
    else:
        router = PowerOfTwo(seed) if router_name == "power_of_two" else BatchingAware(seed)
    order = itertools.count()
    pending = list(requests)
    first_token_s: dict[str, float] = {}
    now, next_report = 0.0, 0.0
    while pending or in_transit or any(e.scheduler.has_unfinished_seqs() for e in engines):
        events = [next_report]  # the next thing to happen: a report, an arrival, a step
        events += [max(e.busy_until, now) for e in engines if e.scheduler.has_unfinished_seqs()]
        if pending:
            events.append(pending[0].arrival_s)
        if in_transit:
            events.append(in_transit[0][0])
        now = min(events)
        if now >= next_report:
            router.report(engines, now)
            next_report = now + report_period_s
        while pending and pending[0].arrival_s <= now:
            request = pending.pop(0)
            replica = router.choose(request, now)
            heapq.heappush(in_transit, (now + timing.hop_s, next(order), replica, request))
        while in_transit and in_transit[0][0] <= now:
            _, _, replica, request = heapq.heappop(in_transit)
            engines[replica].add(request)
        for replica, engine in enumerate(engines):
            if engine.busy_until > now or not engine.scheduler.has_unfinished_seqs():
                continue
            end, seqs = engine.step(now, timing)
            for seq in seqs:
                first_token_s.setdefault(seq.request_id, end)
                if seq.is_finished:
                    router.finished(seq.request_id, replica, end)
    return [first_token_s[r.request_id] - r.arrival_s + timing.serve_overhead_s for r in requests]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", type=int, nargs="+", default=[1280, 2048],
                   help="each engine's KV budget in tokens (max_batch_total_tokens)")  # fmt: skip
    p.add_argument("--long-share", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    p.add_argument("--rate", type=float, nargs="+", default=[6.0, 10.0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--num-requests", type=int, default=240)
    p.add_argument("--report-period-s", type=float, default=0.5)
    p.add_argument("--step-jitter", type=float, default=0.0,
                   help="sigma of the lognormal factor on each step's time")  # fmt: skip
    p.add_argument(
        "--early-stop-share",
        type=float,
        default=0.0,
        help="share of the requests that end at an EOS before their max new tokens",
    )
    p.add_argument("--out", default=str(RESULTS_DIR / "routing_sim.json"))
    args = p.parse_args(argv)
    timing = Timing(jitter=args.step_jitter)
    rows = []
    for kv, share, rate in itertools.product(args.kv, args.long_share, args.rate):
        for seed in range(args.seeds):
            requests = poisson_workload(args.num_requests, rate, share, seed,
                                        early_stop_share=args.early_stop_share)  # fmt: skip
            ttft = {name: percentiles(simulate(requests, name, kv, timing, args.report_period_s,
                                               seed)) for name in ROUTERS}  # fmt: skip
            p99 = {name: round(t["p99"], 1) for name, t in ttft.items()}
            p50 = {name: round(t["p50"], 1) for name, t in ttft.items()}
            rows.append({"kv": kv, "long_share": share, "rate": rate, "seed": seed,
                         "ttft_p50_ms": p50, "ttft_p99_ms": p99})  # fmt: skip
            print(f"kv {kv} long {share} rate {rate} seed {seed}: TTFT p99 "
                  + "  ".join(f"{n} {v:.0f}" for n, v in p99.items()), flush=True)  # fmt: skip
    summary = summarize_ratios(rows)
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as f:
        json.dump({"command": "python -m benchmarks.routing_sim " + " ".join(argv or sys.argv[1:]),
                   "machine": machine(), "timing": timing.__dict__,
                   "report_period_s": args.report_period_s, "num_requests": args.num_requests,
                   "early_stop_share": args.early_stop_share,
                   "summary": summary, "rows": rows}, f, indent=1)  # fmt: skip
    return 0


def summarize_ratios(rows: list[dict]) -> dict:
    """Per router, the default's TTFT p99 over the router's across all runs where the
    default's p99 shows a tail (over twice its p50): median and how many reach 2x."""
    default = "power_of_two"
    tailed = [r for r in rows if r["ttft_p99_ms"][default] > 2 * r["ttft_p50_ms"][default]]
    summary = {"runs": len(rows), "runs_with_a_tail": len(tailed)}
    for name in ROUTERS[1:]:
        ratios = [r["ttft_p99_ms"][default] / r["ttft_p99_ms"][name] for r in tailed]
        summary[name] = {
            "median_default_over_router": round(statistics.median(ratios), 2) if ratios else None,
            "runs_at_2x_or_more": sum(x >= 2 for x in ratios),
            "runs_worse_than_default": sum(x < 1 for x in ratios),
        }
    return summary


if __name__ == "__main__":
    sys.exit(main())
