"""TGIRequestRouter's ranking, driven like Serve drives it, with no Ray cluster.

Replicas are Serve's own `RunningReplica` over `RunningReplicaInfo`s (only the actor
lookup in its constructor is skipped); new engine reports arrive as Serve delivers them,
through `update_replica_info`. Time is a fake clock given to the router.
"""

import asyncio
import dataclasses
import json

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
    RunningReplicaInfo,
)
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica

from deployments.autoscaling import ENGINE_BATCH_TOKEN_USAGE, ENGINE_QUEUED_REQUESTS
from deployments.engine_load import EngineLoad
from deployments.first_token_forecast import SCHEDULER_STATS_KEY, read_snapshot
from deployments.routed_request import RoutedRequest, read_routed_request
from deployments.router import TGIRequestRouter, has_kv_room, joins_at_once, load_score
from deployments.routing_state import InFlightLedger, PrefixIndex, Unreported
from engine.config import EngineConfig
from engine.forecast import SchedulerSnapshot, StepTimes, take_snapshot
from engine.metrics import EngineMetrics
from engine.protocol import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

DEPLOYMENT = DeploymentID(name="TGIServer:m", app_name="default")
CAPACITY = 10_000  # KV tokens of every replica here


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeReplica(RunningReplica):
    """A RunningReplica with no actor behind it (the base constructor looks it up)."""

    def __init__(
        self, name: str, load: EngineLoad | None = None, snapshot: SchedulerSnapshot | None = None
    ):
        self.name = name
        self.report(load, snapshot)

    def report(self, load: EngineLoad | None, snapshot: SchedulerSnapshot | None = None) -> None:
        """A new routing-stats report, delivered the way Serve's long poll delivers it;
        with the engine's scheduler snapshot if given, as TGIServer sends it."""
        stats = load.to_routing_stats() if load else {}
        if snapshot is not None:
            stats[SCHEDULER_STATS_KEY] = json.loads(json.dumps(snapshot.to_dict()))
        info = RunningReplicaInfo(
            replica_id=ReplicaID(unique_id=self.name, deployment_id=DEPLOYMENT),
            node_id=None,
            node_ip=None,
            availability_zone=None,
            actor_name=f"replica-{self.name}",
            max_ongoing_requests=128,
            routing_stats=stats,
        )
        self.update_replica_info(info)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def load(batch_tokens: int = 0, queued: int = 0, *, at: float = 999.0, **kw) -> EngineLoad:
    return EngineLoad(
        num_queued=queued,
        num_running=1 if batch_tokens else 0,
        num_batch_max_tokens=batch_tokens,
        reported_at=at,
        max_batch_total_tokens=CAPACITY,
        **kw,
    )


def generate_body(prompt: str, max_new_tokens: int = 100) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}


class Harness:
    """A router plus the calls Serve makes around one request."""

    def __init__(self, **router_kwargs):
        self.clock = Clock()
        self.router = TGIRequestRouter(
            deployment_id=DEPLOYMENT,
            handle_source=DeploymentHandleSource.REPLICA,
            get_curr_time_s=self.clock,
        )
        self.router.initialize_state(**router_kwargs)
        self._next_id = 0

    def rank(self, replicas: list[FakeReplica], body: dict | None = None) -> list[str]:
        """The ranking for a request that then goes away (Serve reports it completed), so
        looking leaves no reservation behind."""
        pending, ranked = self.choose(replicas, body)
        self.router.on_request_completed(
            replicas[0].replica_id, pending.metadata.internal_request_id
        )
        return ranked

    def choose(
        self, replicas: list[FakeReplica], body: dict | None = None
    ) -> tuple[PendingRequest, list[str]]:
        """choose_replicas for a generate call with this body (a health call if None)."""
        self._next_id += 1

        async def go():
            args = ["POST", "/generate", body, {}] if body is not None else []
            request_id = f"req-{self._next_id}"
            metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id)
            pending = PendingRequest(args=args, kwargs={}, metadata=metadata)
            ranks = await self.router.choose_replicas(replicas, pending)
            return pending, [rank[0].replica_id.unique_id for rank in ranks]

        return asyncio.run(go())

    def send(self, replicas: list[FakeReplica], body: dict) -> tuple[str, str]:
        """Route a request to the first-ranked replica; (request id, replica name)."""
        pending, ranked = self.choose(replicas, body)
        chosen = next(r for r in replicas if r.name == ranked[0])
        self.router.on_request_routed(pending, chosen.replica_id, result=None)
        return pending.metadata.internal_request_id, chosen.name

    def complete(self, request_id: str, replica: FakeReplica) -> None:
        self.router.on_request_completed(replica.replica_id, request_id)


# --- ranking by engine load ------------------------------------------------------------


def test_the_busiest_replica_ranks_last():
    idle, half, full = (
        FakeReplica("idle", load()),
        FakeReplica("half", load(5000)),
        FakeReplica("full", load(9000, queued=4)),
    )
    assert Harness().rank([full, idle, half], generate_body("hi")) == ["idle", "half", "full"]


def test_queued_requests_count_even_with_a_small_batch():
    queued = FakeReplica("queued", load(1000, queued=10))  # 10 x 1000 tokens waiting
    batch = FakeReplica("batch", load(6000))
    assert Harness().rank([queued, batch], generate_body("hi")) == ["batch", "queued"]


def test_kv_blocks_in_use_count_when_they_exceed_the_batch_reservation():
    # Few tokens reserved, but the KV cache is nearly full (e.g. held by the prefix cache).
    crowded = FakeReplica("crowded", load(1000, num_free_blocks=10, num_total_blocks=100))
    roomy = FakeReplica("roomy", load(3000, num_free_blocks=60, num_total_blocks=100))
    assert Harness().rank([crowded, roomy], generate_body("hi")) == ["roomy", "crowded"]


def batch(num_running: int, batch_tokens: int, queued: int = 0) -> EngineLoad:
    return EngineLoad(num_queued=queued, num_running=num_running,
                      num_batch_max_tokens=batch_tokens, reported_at=999.0,
                      max_batch_total_tokens=CAPACITY)  # fmt: skip


def test_among_replicas_with_room_the_smaller_batch_goes_first():
    # One long generation reserves more KV than four short ones, but both batches take a
    # newcomer in at once (TGI's rule: 1 >= floor(0.3 x 4)) and the single one steps faster.
    one_long = FakeReplica("one_long", batch(1, 5000))
    four_short = FakeReplica("four_short", batch(4, 2000))
    ranked = Harness().rank([four_short, one_long], generate_body("hi", 16))
    assert ranked == ["one_long", "four_short"]


def test_a_newcomer_goes_where_the_batch_takes_it_in_at_once_even_if_it_holds_one_more():
    # Seven running and one waiting: one more waiting makes 2 >= floor(0.3 x 7), and both
    # join at the next step. Seven running and none waiting: a newcomer alone (1 < 2) waits
    # up to max_waiting_tokens steps. Serve's default router would pick the second.
    waiting = FakeReplica("waiting", batch(7, 3000, queued=1))
    full_batch = FakeReplica("full_batch", batch(7, 2000))
    assert Harness().rank([full_batch, waiting], generate_body("hi", 16)) == [
        "waiting",
        "full_batch",
    ]
    # With the engines' ratio at 0.1 both take it in at once: fewer requests first.
    h = Harness(waiting_served_ratio=0.1)
    assert h.rank([waiting, full_batch], generate_body("hi", 16)) == ["full_batch", "waiting"]
    # Two requests more is too many: the smaller batch, though the newcomer waits there.
    bigger = FakeReplica("bigger", batch(9, 3000, queued=1))  # 2 >= floor(0.3 x 9)
    assert Harness().rank([bigger, full_batch], generate_body("hi", 16))[0] == "full_batch"


def test_requests_sent_since_the_report_count_as_joined_the_batch():
    six = FakeReplica("six", batch(6, 3000))  # a newcomer joins: 1 >= floor(0.3 x 6)
    waiting = FakeReplica("waiting", batch(7, 3000, queued=1))  # joins too: 2 >= 2
    h = Harness()
    assert h.send([waiting, six], generate_body("hi", 16))[1] == "six"  # fewer requests
    # The one just sent made that batch seven with none waiting: the next one would wait
    # there, but joins the other batch at once, though it holds eight requests to seven.
    assert h.rank([six, waiting], generate_body("hi", 16)) == ["waiting", "six"]
    assert joins_at_once(batch(6, 3000), 0, 0.3)
    assert not joins_at_once(batch(6, 3000), 1, 0.3)
    assert joins_at_once(batch(4, 3000), 0, 0.3)  # 1 >= floor(1.2): not 1 >= 1.2
    assert joins_at_once(None, 0, 0.3)  # not reported yet, nothing sent: empty


def test_a_replica_without_room_for_the_request_ranks_after_those_with_room():
    nearly_full = FakeReplica("nearly_full", batch(1, 8500))
    busy = FakeReplica("busy", batch(3, 3000))
    h = Harness()
    assert h.rank([busy, nearly_full], generate_body("hi", 16)) == ["nearly_full", "busy"]
    # 2000 tokens do not fit in nearly_full's last 1500.
    long = generate_body("x" * 4000, max_new_tokens=1000)
    assert h.rank([busy, nearly_full], long) == ["busy", "nearly_full"]


def blocks(num_running: int, batch_tokens: int, free_blocks: int) -> EngineLoad:
    """An embedded engine's report: 100 KV blocks of 100 tokens, `free_blocks` free."""
    return dataclasses.replace(batch(num_running, batch_tokens), num_free_blocks=free_blocks,
                               num_total_blocks=100)  # fmt: skip


def test_an_engine_that_grows_its_kv_takes_a_short_request_its_reservations_would_refuse():
    # Two long generations halfway through: they reserve 9950 of 10000 tokens but use
    # 4000; a 101-token request plus their growth meanwhile (2 x 100) fits the 6000 free.
    longs = FakeReplica("longs", blocks(2, 9950, free_blocks=60))
    shorts = FakeReplica("shorts", blocks(4, 2000, free_blocks=80))
    assert Harness().rank([shorts, longs], generate_body("hi", 100)) == ["longs", "shorts"]


def test_the_running_batch_growth_counts_against_the_free_kv_blocks():
    # 2000 tokens free, but the two running sequences will grow by their last 1000
    # reserved tokens while a 1000-token generation runs: it ranks after a roomier replica.
    growing = FakeReplica("growing", blocks(2, 9000, free_blocks=20))
    roomy = FakeReplica("roomy", blocks(4, 4000, free_blocks=50))
    h = Harness()
    assert h.rank([growing, roomy], generate_body("hi", 1000)) == ["roomy", "growing"]
    # A short one fits there: the batch grows by 2 x 16 tokens meanwhile.
    assert h.rank([growing, roomy], generate_body("hi", 16)) == ["growing", "roomy"]


def test_has_kv_room_counts_the_queue_and_what_was_sent_since_the_report():
    report = dataclasses.replace(blocks(1, 1000, free_blocks=50), num_queued_tokens=3000)
    assert has_kv_room(report, 0.1, 1000, 100, unreported_tokens=0, capacity=CAPACITY)
    assert not has_kv_room(report, 0.1, 1000, 100, unreported_tokens=1500, capacity=CAPACITY)
    # Without block gauges (real TGI) the reservations must fit.
    assert not has_kv_room(batch(1, 9500), 0.95, 1000, 100, 0, CAPACITY)


def test_routed_requests_count_before_the_next_report_and_completion_undoes_them():
    h = Harness()
    a, b = FakeReplica("a", load(2000)), FakeReplica("b", load(2500))
    body = generate_body("x" * 4000, max_new_tokens=1000)  # ~2000 tokens
    assert h.rank([a, b], generate_body("hi")) == ["a", "b"]

    request_id, chosen = h.send([a, b], body)
    assert chosen == "a"
    h.clock.now += 1
    assert h.rank([a, b], generate_body("hi")) == ["b", "a"]  # a: 2000 + ~2000 in flight

    h.complete(request_id, a)
    assert h.rank([a, b], generate_body("hi")) == ["a", "b"]


def test_a_report_taken_after_routing_replaces_the_in_flight_estimate():
    h = Harness()
    a, b = FakeReplica("a", load(2000)), FakeReplica("b", load(3000))
    h.send([a, b], generate_body("x" * 4000, max_new_tokens=1000))  # ~2000 tokens, to a
    h.clock.now += 1
    assert h.rank([a, b], generate_body("hi")) == ["b", "a"]
    # a's engine now reports the request itself (smaller than estimated): counted once.
    a.report(load(2900, at=h.clock.now))
    assert h.rank([a, b], generate_body("hi")) == ["a", "b"]


def test_finishing_a_request_the_last_report_counted_frees_its_tokens_at_once():
    h = Harness()
    a, b = FakeReplica("a", load(0)), FakeReplica("b", load(3000))
    request_id, _ = h.send([a, b], generate_body("x" * 4000, max_new_tokens=3000))
    h.clock.now += 1
    a.report(load(4000, at=h.clock.now))  # the report includes the request
    h.clock.now += 1
    assert h.rank([a, b], generate_body("hi")) == ["b", "a"]
    h.complete(request_id, a)  # finished after that report: the report overstates a
    assert h.rank([a, b], generate_body("hi")) == ["a", "b"]


def test_replicas_without_a_report_count_as_empty_plus_what_was_sent_to_them():
    h = Harness()
    fresh, old = FakeReplica("fresh"), FakeReplica("old")
    busy = FakeReplica("busy", load(1000))
    _, first = h.send([fresh, old, busy], generate_body("x" * 400))
    assert first in ("fresh", "old")
    other = "old" if first == "fresh" else "fresh"
    for _ in range(5):  # not a coin toss between two empty replicas
        assert h.rank([fresh, old, busy], generate_body("hi")) == [other, first, "busy"]


def test_a_burst_ranked_before_any_acceptance_spreads_over_the_replicas():
    h = Harness()
    replicas = [FakeReplica(name, load()) for name in "abc"]
    firsts = [h.choose(replicas, generate_body("x" * 400))[1][0] for _ in range(3)]
    assert sorted(firsts) == ["a", "b", "c"]


def test_a_reservation_never_accepted_expires():
    h = Harness(reservation_ttl_s=5.0)
    a, b = FakeReplica("a", load(1000)), FakeReplica("b", load(1500))
    h.choose([a, b], generate_body("x" * 4000, max_new_tokens=1000))  # reserved on a
    assert h.rank([a, b], generate_body("hi"))[0] == "b"
    h.clock.now += 6
    assert h.rank([a, b], generate_body("hi"))[0] == "a"


def test_calls_that_are_not_generation_reserve_nothing():
    h = Harness()
    a, b = FakeReplica("a", load(1000)), FakeReplica("b", load(1500))
    for _ in range(3):
        assert h.rank([a, b]) == ["a", "b"]  # health checks


# --- prefix affinity ---------------------------------------------------------------------

SYSTEM_PROMPT = "You are a helpful assistant who answers in French. " * 10  # 510 chars


def test_a_shared_prefix_goes_back_to_its_replica_while_loads_are_close():
    h = Harness(affinity_slack=0.1)
    a, b = FakeReplica("a", load(1000)), FakeReplica("b", load(2000))
    request_id, chosen = h.send([a, b], generate_body(SYSTEM_PROMPT + "Hello"))
    assert chosen == "a"
    h.complete(request_id, a)
    b.report(load(500))  # b is now a little less loaded than a (0.05 vs 0.10)
    assert h.rank([a, b], generate_body(SYSTEM_PROMPT + "Bonjour")) == ["a", "b"]
    assert h.rank([a, b], generate_body("Unrelated question")) == ["b", "a"]


def test_an_overloaded_replica_loses_its_prefixes():
    h = Harness(affinity_slack=0.1)
    a, b = FakeReplica("a", load(1000)), FakeReplica("b", load(2000))
    request_id, _ = h.send([a, b], generate_body(SYSTEM_PROMPT + "Hello"))
    h.complete(request_id, a)
    a.report(load(8000, queued=2))
    assert h.rank([a, b], generate_body(SYSTEM_PROMPT + "Bonjour")) == ["b", "a"]


def test_chat_messages_share_a_prefix_through_their_system_prompt():
    h = Harness()
    a, b = FakeReplica("a", load(1000)), FakeReplica("b", load(1100))

    def chat(question: str) -> dict:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        return {"messages": messages, "max_tokens": 50}

    args = ["/v1/chat/completions", chat("Hello"), {}]
    pending = asyncio.run(_pending(args))
    h.router.on_request_routed(pending, b.replica_id, result=None)  # served on b before
    h.complete(pending.metadata.internal_request_id, b)
    assert h.rank([a, b], chat("Bonjour"))[0] == "b"


async def _pending(args: list) -> PendingRequest:
    metadata = RequestMetadata(request_id="chat", internal_request_id="chat")
    return PendingRequest(args=args, kwargs={}, metadata=metadata)


def test_the_prefix_index_stays_bounded_and_forgets_the_least_recent():
    index = PrefixIndex(prefix_lengths=[16, 32], max_entries=10)
    for i in range(100):
        index.record(f"prompt {i:04d} " + "y" * 40, replica_id=f"r{i}")
    assert len(index) == 10
    assert index.lookup("prompt 0099 " + "y" * 40) == "r99"
    assert index.lookup("prompt 0000 " + "y" * 40) is None


def test_the_prefix_index_matches_the_longest_prefix_and_skips_short_prompts():
    index = PrefixIndex(prefix_lengths=[4, 16], max_entries=100)
    index.record("abcd-shared-long-prefix-one", "r1")
    index.record("abcd-other", "r2")  # its 4-char key now points at r2
    assert index.lookup("abcd-shared-long-prefix-two") == "r1"  # 16 chars match r1
    assert index.lookup("abcd-something") == "r2"
    assert index.lookup("abc") is None
    index.forget_replicas_except(["r1"])
    assert index.lookup("abcd-something") is None


def test_the_router_prefix_index_is_bounded_by_its_kwarg():
    h = Harness(prefix_lengths_chars=[12], max_prefix_entries=5)
    a = FakeReplica("a", load())
    for i in range(20):
        h.send([a], generate_body(f"question {i:03d}"))
    assert len(h.router._prefix_index) == 5


def test_serve_loads_the_router_and_its_kwargs_from_the_config():
    kwargs = {"prefix_lengths_chars": [32, 512], "max_prefix_entries": 100, "affinity_slack": 0.2}
    cfg = RequestRouterConfig(
        request_router_class="deployments.router:TGIRequestRouter", request_router_kwargs=kwargs
    )
    router_class = cfg.get_request_router_class()  # cloudpickled by value, as Serve ships it
    router = router_class(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.REPLICA)
    router.initialize_state(**cfg.request_router_kwargs)
    a, b = FakeReplica("a", load(3000)), FakeReplica("b", load(1000))
    ranks = asyncio.run(router.choose_replicas([a, b]))
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["b", "a"]


# --- ranking by a first-token forecast ----------------------------------------------------


def engine_snapshot(num_new_tokens_left: int, *, at: float = 999.99) -> SchedulerSnapshot:
    """An engine with a 1,024-token cache running one sequence of 513 tokens (32 of its 64
    blocks) that has `num_new_tokens_left` tokens to go; its steps take 10 ms. Taken one
    step before the harness clock's now."""
    scheduler = Scheduler(EngineConfig(model_dir="", max_batch_total_tokens=1024))
    params = SamplingParams(max_new_tokens=num_new_tokens_left + 1)
    scheduler.add(Sequence("running", list(range(512)), params, block_size=16))
    seqs, _ = scheduler.schedule()  # its prefill: its first token
    scheduler.postprocess(scheduler.finish_prefill(seqs), [7])
    snapshot = take_snapshot(
        scheduler, StepTimes(0.010, prefill_base_s=0.010, prefill_s_per_token=1e-5)
    )
    return dataclasses.replace(snapshot, taken_at=at)


# 700 prompt tokens (4 characters each): 44 blocks, more than the 32 either engine has free.
LONG_PROMPT = "x" * 2800


def test_the_replica_whose_cache_frees_sooner_ranks_first_whatever_its_load():
    h = Harness()
    # By load, "a" looks better (less reserved); its sequence runs 400 more steps, b's 20.
    a = FakeReplica("a", load(600), engine_snapshot(400))
    b = FakeReplica("b", load(900), engine_snapshot(20))
    assert h.rank([a, b], generate_body(LONG_PROMPT, 10)) == ["b", "a"]
    assert h.rank([a, b], generate_body("Hi", 10)) == ["a", "b"]  # fits both: load decides
    assert h.rank([a, b], generate_body("", 10)) == ["a", "b"]  # no prompt: no forecast


def test_requests_sent_since_the_snapshot_count_in_the_forecast():
    h = Harness()
    a = FakeReplica("a", load(900), engine_snapshot(20))
    b = FakeReplica("b", load(900), engine_snapshot(60))
    _, first = h.send([a, b], generate_body(LONG_PROMPT, 200))
    assert first == "a"  # its sequence ends 40 steps sooner
    # The first one holds a's cache for 200 steps after those 20: b frees room sooner now.
    assert h.rank([a, b], generate_body(LONG_PROMPT, 10)) == ["b", "a"]


def test_equal_forecasts_keep_the_prefix_affinity():
    h = Harness(affinity_slack=0.1)
    a = FakeReplica("a", load(1000), engine_snapshot(5))
    b = FakeReplica("b", load(2000), engine_snapshot(5))
    request_id, chosen = h.send([a, b], generate_body(SYSTEM_PROMPT + "Hello", 10))
    assert chosen == "a"
    h.complete(request_id, a)
    b.report(load(500), engine_snapshot(5))  # a little less loaded than a now
    assert h.rank([a, b], generate_body(SYSTEM_PROMPT + "Bonjour", 10)) == ["a", "b"]


def test_one_engines_own_step_time_estimate_does_not_decide():
    h = Harness()
    # An idle engine whose only prefill so far was a cold, 2 s one, beside a busy engine.
    cold = dataclasses.replace(engine_snapshot(0), running=[], num_free_blocks=64,
                               prefill_base_s=2.0)  # fmt: skip
    a = FakeReplica("a", load(), cold)
    b = FakeReplica("b", load(900), engine_snapshot(300))
    assert h.rank([a, b], generate_body("Hi", 10)) == ["a", "b"]


def test_a_snapshot_of_another_format_is_ignored():
    snapshot = engine_snapshot(20).to_dict()
    assert read_snapshot({SCHEDULER_STATS_KEY: snapshot}) is not None
    assert read_snapshot({SCHEDULER_STATS_KEY: {**snapshot, "new_field": 1}}) is None
    assert read_snapshot({SCHEDULER_STATS_KEY: {**snapshot, "running": [[1, 2, 3]]}}) is None
    assert read_snapshot({SCHEDULER_STATS_KEY: "junk"}) is None and read_snapshot({}) is None


def test_forecasts_off_leave_the_load_ranking():
    h = Harness(forecast_max_seq_steps=0)
    a = FakeReplica("a", load(600), engine_snapshot(400))
    b = FakeReplica("b", load(900), engine_snapshot(20))
    assert h.rank([a, b], generate_body(LONG_PROMPT, 10)) == ["a", "b"]


# --- the pieces ----------------------------------------------------------------------------


def test_the_ledger_counts_only_what_the_last_report_cannot_show():
    ledger = InFlightLedger(reservation_ttl_s=5.0)
    ledger.confirm("before", "a", 100, now=10.0)
    ledger.confirm("after", "a", 30, now=20.0)
    assert ledger.unreported({"a": 15.0}, now=21.0) == {"a": Unreported(30, 1)}
    assert ledger.unreported({"a": None}, now=21.0) == {"a": Unreported(130, 2)}
    ledger.finish("before", now=22.0)  # counted by the report at 15, gone since
    assert ledger.unreported({"a": 15.0}, now=23.0) == {"a": Unreported(30 - 100, 1 - 1)}
    assert ledger.unreported({"a": 25.0}, now=26.0) == {"a": Unreported(0, 0)}  # in the report
    ledger.finish("unknown", now=27.0)  # a rejected request: ignored
    assert len(ledger) == 1


def test_load_score_is_projected_tokens_over_capacity():
    assert load_score(None, 500, 256, capacity=1000) == 0.5
    busy = load(4000, queued=2)  # 2 queued requests the size of the running one
    assert load_score(busy, 1000, 256, capacity=1) == pytest.approx((4000 + 8000 + 1000) / 10_000)


def test_read_routed_request_from_the_ingress_calls():
    body = generate_body("Hello", max_new_tokens=20)
    assert read_routed_request(["POST", "/generate", body, {}], {}) == RoutedRequest("Hello", 20)
    assert read_routed_request(["/generate_stream", body, {}], {}) == RoutedRequest("Hello", 20)
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert read_routed_request(["/v1/chat/completions", chat, {}], {}) == RoutedRequest(
        "user\nHi\n", None
    )
    completion = {"prompt": ["a", "b"], "max_tokens": 7}
    assert read_routed_request(["POST", "/v1/completions", completion, None], {}) == (
        RoutedRequest("a\nb", 7)
    )
    assert read_routed_request([], {}) is None  # health
    assert read_routed_request(["GET", "/info"], {}) is None
    assert read_routed_request(["POST", "/tokenize", body, {}], {}) is None
    assert RoutedRequest("x" * 40, None).estimate_tokens(4.0, 256) == 10 + 256


def test_engine_load_reads_the_embedded_engines_metrics():
    metrics = EngineMetrics(max_input_tokens=100, max_total_tokens=200, max_batch_total_tokens=4096)
    metrics.queue_size.set(3)
    metrics.batch_current_size.set(2)
    metrics.batch_current_max_tokens.set(1024)
    metrics.kv_blocks_free.set(100)
    metrics.kv_blocks_total.set(256)
    parsed = EngineLoad.from_metrics_text(metrics.render().decode(), reported_at=5.0)
    assert parsed == EngineLoad(
        num_queued=3, num_running=2, num_batch_max_tokens=1024, reported_at=5.0,
        max_batch_total_tokens=4096, num_free_blocks=100, num_total_blocks=256,
    )  # fmt: skip
    assert EngineLoad.from_routing_stats(parsed.to_routing_stats()) == parsed
    assert parsed.to_autoscaling_stats() == {
        ENGINE_QUEUED_REQUESTS: 3.0,
        ENGINE_BATCH_TOKEN_USAGE: 0.25,
    }


def test_engine_load_reads_real_tgi_metrics_and_rejects_others():
    tgi = "tgi_queue_size 1\ntgi_batch_current_size 4\ntgi_batch_current_max_tokens 900\n"
    parsed = EngineLoad.from_metrics_text(tgi, reported_at=1.0)
    assert (parsed.num_queued, parsed.max_batch_total_tokens, parsed.kv_used_fraction) == (
        1, None, None
    )  # fmt: skip
    assert parsed.to_autoscaling_stats() == {ENGINE_QUEUED_REQUESTS: 1.0}
    with pytest.raises(ValueError, match="tgi_queue_size"):
        EngineLoad.from_metrics_text("tgi_batch_current_size 4\n")
    assert EngineLoad.from_routing_stats({}) is None


def test_concurrent_calls_sharing_one_request_id_are_all_routed():
    # Handle calls made inside one ingress request inherit its internal request id; with
    # exact-id matching alone the second of two concurrent calls was never fulfilled.
    async def go():
        router = TGIRequestRouter(
            deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.REPLICA
        )
        replicas = [FakeReplica("a", load()), FakeReplica("b", load())]
        router.update_replicas(replicas)
        metadata = RequestMetadata(request_id="parent", internal_request_id="parent")
        pending = [
            PendingRequest(args=["POST", "/generate", generate_body("hi"), {}], kwargs={},
                           metadata=metadata)
            for _ in range(3)
        ]  # fmt: skip
        # Serve's own entry point for routing one request (what a handle call awaits).
        chosen = await asyncio.wait_for(
            asyncio.gather(*(router._choose_replica_for_request(p) for p in pending)), 10
        )
        return [replica.replica_id.unique_id for replica in chosen]

    assert len(asyncio.run(go())) == 3
