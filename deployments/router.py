"""TGIRequestRouter: send each request to the replica whose engine batch has most room.

A Serve RequestRouter (alpha API) for the TGIServer deployment, set with
`RequestRouterConfig(request_router_class="deployments.router:TGIRequestRouter")`.
Serve builds one router per deployment handle (in the ingress replica), and calls
`choose_replicas` for every request, `on_request_routed` once a replica accepted it and
`on_request_completed` when it ends.

The load of a replica is what its engine reports (`EngineLoad`, polled by the Serve
controller every `request_routing_stats_period_s` and broadcast to routers), corrected by
the requests this router sent since (`InFlightLedger`): its score is the projected batch
tokens over the KV capacity, or the KV blocks in use if that is higher, and its requests are
those running and queued. Replicas rank as the engine would serve the request:
  1. those whose KV cache has room for it (`has_kv_room`) before the others: the engine
     admits it at once instead of queueing it or, later, preempting;
  2. among them, fewer requests first (a smaller batch steps faster), where a batch that
     takes the request in at the next step (`joins_at_once`) counts one request fewer than
     it holds: under TGI's waiting_served_ratio rule (0.3) a lone newcomer to a batch of
     seven with none waiting waits up to max_waiting_tokens decode steps, while one more
     request for a batch of seven with one waiting lets both in at once — the
     count-balancing default router picks the first. The bonus is one request only: more
     would pile requests onto one batch, whose every step then takes longer;
  3. then the batch it joins at once, then the lower score.
A prompt whose prefix a replica served recently goes back there (its prefix cache holds
the KV) if that replica has room and its score is at most `affinity_slack` above the
lowest.

Replicas that report their engine's scheduler (the embedded engine) then rank by when the
request would get its first token there (deployments/first_token_forecast.py), the order
above breaking ties and ranking the others.
"""

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from deployments.engine_load import EngineLoad
from deployments.first_token_forecast import rank_by_first_token, read_snapshot
from deployments.routed_request import RoutedRequest, read_routed_request
from deployments.routing_state import InFlightLedger, PrefixIndex, Unreported

TGI_WAITING_SERVED_RATIO = 0.3  # text-generation-launcher's default, and the engine's


def load_score(
    load: EngineLoad | None, unreported_tokens: int, default_request_tokens: int, capacity: int
) -> float:
    """A replica's projected load as a share of its KV capacity (may exceed 1 with a queue).

    `capacity` is used when the replica does not report its own (real TGI before its
    first report, or a replica not reported at all, which counts as empty).
    """
    if load is None:
        return max(unreported_tokens, 0) / capacity
    capacity = load.max_batch_total_tokens or capacity
    queued_tokens = load.num_queued_tokens
    if queued_tokens is None:  # no engine reports it: queued requests look like running ones
        per_request = (
            load.num_batch_max_tokens / load.num_running
            if load.num_running
            else default_request_tokens
        )
        queued_tokens = load.num_queued * per_request
    projected = max(load.num_batch_max_tokens + queued_tokens + unreported_tokens, 0)
    score = projected / capacity
    kv_used = load.kv_used_fraction
    if kv_used is not None:  # blocks also held by the prefix cache, or not yet reserved
        score = max(score, kv_used + unreported_tokens / capacity)
    return score


def has_kv_room(
    load: EngineLoad | None,
    score: float,
    request_tokens: int,
    request_new_tokens: int,
    unreported_tokens: int,
    capacity: int,
) -> bool:
    """Whether a replica's KV cache can take a request of `request_tokens` (prompt + new)
    without queueing it for blocks or preempting someone while it runs.

    An engine that reports its KV blocks (the embedded one) allocates them as sequences
    grow: what counts is the blocks free now against what the request needs plus what the
    running batch grows by meanwhile (each sequence by up to the request's new tokens, in
    all at most what the batch has reserved but not used yet), the queue ahead of it and
    what was sent since the report. Otherwise (real TGI, which reserves prompt +
    max_new_tokens at admission) the reservations must fit: score + the request's share.
    """
    if load is None or load.num_free_blocks is None or not load.num_total_blocks:
        return score + request_tokens / capacity <= 1.0
    capacity = load.max_batch_total_tokens or capacity
    tokens_per_block = capacity / load.num_total_blocks
    free_tokens = load.num_free_blocks * tokens_per_block
    used_tokens = capacity - free_tokens
    unused_reservation = max(load.num_batch_max_tokens - used_tokens, 0)
    growth = min(unused_reservation, load.num_running * request_new_tokens)
    queued = load.num_queued_tokens or 0
    needed = request_tokens + growth + queued + max(unreported_tokens, 0)
    return needed <= free_tokens


def joins_at_once(
    load: EngineLoad | None, unreported_requests: int, waiting_served_ratio: float
) -> bool:
    """Whether a new request joins the replica's running batch at its next step under
    TGI's rule: when the waiting requests (it included) are at least
    floor(`waiting_served_ratio` x the running ones). Requests sent since the report count
    as running (they most likely joined; if they wait, it only helps). The rule's other
    way in (max_waiting_tokens steps since the last join) is not reported, so not known."""
    num_running = load.num_running if load else 0
    num_queued = load.num_queued if load else 0
    num_running = max(num_running + unreported_requests, 0)
    return num_queued + 1 >= math.floor(waiting_served_ratio * num_running)


@dataclass(frozen=True)
class ReplicaLoad:
    """What the ranking knows of one replica, for the request being routed."""

    score: float  # load_score: projected KV reservation over capacity
    num_requests: int  # running + queued at its last report + sent since
    has_room: bool  # the request's tokens fit in the KV budget the score leaves
    joins_at_once: bool  # the batch takes it in at the next step (see joins_at_once)


def rank_replicas(
    loads: dict[Hashable, ReplicaLoad], preferred: Hashable | None, affinity_slack: float
) -> list[Hashable]:
    """Replica ids, best first (see the module docstring); equal ones in random order, so
    they share the requests."""
    ranked = sorted(
        loads,
        key=lambda r: (not loads[r].has_room,
                       loads[r].num_requests - loads[r].joins_at_once,
                       not loads[r].joins_at_once, loads[r].score, random.random()),
    )  # fmt: skip
    lowest = min(load.score for load in loads.values())
    chosen = loads.get(preferred)
    if chosen is not None and chosen.has_room and chosen.score <= lowest + affinity_slack:
        ranked.remove(preferred)
        ranked.insert(0, preferred)
    return ranked


def replica_loads(
    reports: dict[Hashable, EngineLoad | None],
    unreported: dict[Hashable, Unreported],
    request_tokens: int,
    request_new_tokens: int,
    default_max_new_tokens: int,
    default_capacity_tokens: int,
    waiting_served_ratio: float,
) -> dict[Hashable, ReplicaLoad]:
    """What the ranking knows of each replica: its last report (None: none yet) plus what
    this router sent it since (`InFlightLedger.unreported`), for a request of
    `request_tokens` (0: not a generation), `request_new_tokens` of them generated."""
    capacities = [load.max_batch_total_tokens for load in reports.values() if load]
    # Replicas of one deployment share a configuration: one that has not reported yet
    # most likely has the capacity the others report.
    capacity = max((c for c in capacities if c), default=default_capacity_tokens)
    by_replica = {}
    for r, load in reports.items():
        sent = unreported[r]
        score = load_score(load, sent.num_tokens, default_max_new_tokens, capacity)
        reported = load.num_running + load.num_queued if load else 0
        room = has_kv_room(load, score, request_tokens, request_new_tokens, sent.num_tokens,
                           capacity)  # fmt: skip
        by_replica[r] = ReplicaLoad(
            score=score, num_requests=max(reported + sent.num_requests, 0), has_room=room,
            joins_at_once=joins_at_once(load, sent.num_requests, waiting_served_ratio),
        )  # fmt: skip
    return by_replica


class TGIRequestRouter(FIFOMixin, RequestRouter):
    """Batching-aware ranking with prefix affinity; see the module docstring.

    A replica chosen for a request goes to that very request (its affinity and its
    reservation were computed for it), matched by internal request id. Handle calls made
    inside one Serve request share their parent's id, so when the match finds none (its
    namesake took it), FIFOMixin's fallback hands the replica to the oldest waiting request:
    without it, a second concurrent call under one request id would wait forever.
    """

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialize_state()  # defaults; Serve calls it again with request_router_kwargs

    def initialize_state(
        self,
        prefix_lengths_chars: Sequence[int] = (64, 256, 1024, 4096),
        max_prefix_entries: int = 10_000,
        affinity_slack: float = 0.1,
        chars_per_token: float = 4.0,
        default_max_new_tokens: int = 256,
        default_capacity_tokens: int = 16_384,
        reservation_ttl_s: float = 5.0,
        waiting_served_ratio: float = TGI_WAITING_SERVED_RATIO,
        forecast_max_seq_steps: int = 20_000,
    ) -> None:
        """Configuration, from `RequestRouterConfig.request_router_kwargs`.

        prefix_lengths_chars: prompt prefix lengths (characters) keyed for affinity.
        max_prefix_entries: bound on remembered prefixes (least recently used go first).
        affinity_slack: how much higher (in KV-capacity share) the prefix's replica may
            score than the best replica and still be chosen.
        chars_per_token: prompt characters per token, to estimate a request's tokens.
        default_max_new_tokens: new tokens assumed when a request does not say.
        default_capacity_tokens: KV capacity assumed for a replica until it reports one.
        reservation_ttl_s: how long a ranked but never accepted request counts.
        waiting_served_ratio: the engines' --waiting-served-ratio.
        forecast_max_seq_steps: how far a first-token forecast looks ahead, in sequences
            stepped (a step of n sequences counts n); 0: no forecasts.
        """
        self._prefix_index = PrefixIndex(prefix_lengths_chars, max_prefix_entries)
        self._ledger = InFlightLedger(reservation_ttl_s)
        self._affinity_slack = affinity_slack
        self._chars_per_token = chars_per_token
        self._default_max_new_tokens = default_max_new_tokens
        self._default_capacity_tokens = default_capacity_tokens
        self._waiting_served_ratio = waiting_served_ratio
        self._forecast_max_seq_steps = forecast_max_seq_steps

    # --- ranking -----------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, best first: Serve tries them in order and skips
        those at max_ongoing_requests."""
        if not candidate_replicas:
            return []
        request = _read(pending_request)
        num_tokens = self._estimate_tokens(request) if request else 0
        num_new_tokens = (request.max_new_tokens or self._default_max_new_tokens) if request else 0
        ranked_ids = rank_replicas(
            self._loads(candidate_replicas, num_tokens, num_new_tokens),
            self._prefix_index.lookup(request.prompt) if request else None,
            self._affinity_slack,
        )
        if request is not None and self._forecast_max_seq_steps:
            ranked_ids = self._by_first_token(
                ranked_ids, candidate_replicas, num_tokens - num_new_tokens, num_new_tokens
            )
        if request is not None and pending_request is not None:
            self._ledger.reserve(
                pending_request.metadata.internal_request_id,
                ranked_ids[0],
                num_tokens,
                self._get_curr_time_s(),
                num_new_tokens,
            )
        by_id = {r.replica_id: r for r in candidate_replicas}
        return [[by_id[replica_id]] for replica_id in ranked_ids]

    def _loads(
        self, replicas: list[RunningReplica], request_tokens: int, request_new_tokens: int
    ) -> dict[Hashable, ReplicaLoad]:
        """Each replica's load, given a request of `request_tokens` (0: not a generation),
        `request_new_tokens` of them generated."""
        reports = {r.replica_id: EngineLoad.from_routing_stats(r.routing_stats) for r in replicas}
        unreported = self._ledger.unreported(
            {r: load.reported_at if load else None for r, load in reports.items()},
            self._get_curr_time_s(),
        )
        return replica_loads(
            reports, unreported, request_tokens, request_new_tokens,
            self._default_max_new_tokens, self._default_capacity_tokens,
            self._waiting_served_ratio,
        )  # fmt: skip

    def _by_first_token(
        self, ranked_ids: list[Hashable], replicas: list[RunningReplica],
        num_prompt_tokens: int, num_new_tokens: int,
    ) -> list[Hashable]:  # fmt: skip
        snapshots = {r.replica_id: read_snapshot(r.routing_stats) for r in replicas}
        sent_since = {
            r: self._ledger.sent_since(r, snapshot.taken_at)
            for r, snapshot in snapshots.items()
            if snapshot is not None
        }
        return rank_by_first_token(
            ranked_ids, snapshots, sent_since, (num_prompt_tokens, num_new_tokens),
            self._get_curr_time_s(), self._forecast_max_seq_steps,
        )  # fmt: skip

    def _estimate_tokens(self, request: RoutedRequest) -> int:
        return request.estimate_tokens(self._chars_per_token, self._default_max_new_tokens)

    # --- request lifecycle -------------------------------------------------------------

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        request = _read(pending_request)
        if request is None:
            return
        self._ledger.confirm(
            pending_request.metadata.internal_request_id,
            replica_id,
            self._estimate_tokens(request),
            self._get_curr_time_s(),
            request.max_new_tokens or self._default_max_new_tokens,
        )
        if request.prompt:
            self._prefix_index.record(request.prompt, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._ledger.finish(internal_request_id, self._get_curr_time_s())

    # --- replica set -------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget_gone_replicas()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget_gone_replicas()

    def _forget_gone_replicas(self) -> None:
        live = self.curr_replicas.keys()
        self._prefix_index.forget_replicas_except(live)
        self._ledger.forget_replicas_except(live)


def _read(pending_request: PendingRequest | None) -> RoutedRequest | None:
    if pending_request is None:
        return None
    return read_routed_request(pending_request.args, pending_request.kwargs)
