"""Ranking replicas by when a request would get its first token on each.

Load figures (free KV blocks, queue length, requests) cannot tell which of two busy
replicas starts a request sooner: that depends on when each engine's running sequences
finish and free their blocks, who waits ahead, and TGI's admission rule, and the figures
are up to a report period old. A replica running the embedded engine reports its
scheduler's snapshot with its routing stats (under `SCHEDULER_STATS_KEY`);
`rank_by_first_token` steps each snapshot forward with the requests sent to it since
(engine/forecast.py) and puts the soonest first. In simulation (benchmarks/routing_sim.py)
the default router's TTFT p99 over ours went from 0.98x to 1.36x (median over the runs
with a tail) where an oracle gets 1.44x, and from 1.07x to 1.88x with each KV cache holding 768
tokens (oracle 2.13x; 1.56x when steps take random times and half the requests end early);
docs/benchmarks.md. Forecasting only when the load figures said no replica could take the
request at once gave 1.22x there: the figures were wrong about that too often."""

import dataclasses
import math
import statistics
from collections.abc import Hashable, Mapping
from typing import Any

from engine.forecast import SchedulerSnapshot, first_token_delay_s

SCHEDULER_STATS_KEY = "scheduler"


def read_snapshot(routing_stats: Mapping[str, Any]) -> SchedulerSnapshot | None:
    """The scheduler snapshot in a replica's routing stats; None if it sent none (real
    TGI, or no report yet) or one this version cannot read."""
    data = routing_stats.get(SCHEDULER_STATS_KEY)
    if not isinstance(data, Mapping):
        return None
    try:
        return SchedulerSnapshot.from_dict(dict(data))
    except (TypeError, ValueError):
        return None


def rank_by_first_token(
    ranked: list[Hashable],
    snapshots: Mapping[Hashable, SchedulerSnapshot | None],
    sent_since: Mapping[Hashable, list[tuple[float, int, int]]],
    request: tuple[int, int],
    now: float,
    max_seq_steps: int,
) -> list[Hashable]:
    """`ranked` reordered by when `request` (prompt tokens, new tokens), sent at `now`,
    would get its first token on each replica, soonest first. `sent_since[r]`: (sent at,
    prompt tokens, new tokens) of the requests sent to r after its snapshot.

    Forecasts within one decode step of the soonest count as equal: those replicas keep
    `ranked`'s order (load, then prefix affinity, which the forecast does not model), and
    so do replicas with no snapshot or no first token within `max_seq_steps` (see
    `first_token_delay_s`), after the others."""
    snapshots = _with_shared_step_times(snapshots)
    first_token_at = {}
    one_step = 0.0  # the replicas' shared decode step time
    for replica in ranked:
        snapshot = snapshots.get(replica)
        delay = None
        if snapshot is not None:
            since = snapshot.taken_at
            sent = [(max(at - since, 0.0), p, n) for at, p, n in sent_since.get(replica, [])]
            delay = first_token_delay_s(snapshot, sent, (max(now - since, 0.0), *request),
                                        max_seq_steps)  # fmt: skip
            one_step = snapshot.decode_s
        first_token_at[replica] = math.inf if delay is None else snapshot.taken_at + delay
    soonest = min(first_token_at.values())
    tied_until = soonest + one_step
    tied = [r for r in ranked if first_token_at[r] <= tied_until]
    later = sorted((r for r in ranked if first_token_at[r] > tied_until),
                   key=first_token_at.__getitem__)  # fmt: skip
    return tied + later


def _with_shared_step_times(
    snapshots: Mapping[Hashable, SchedulerSnapshot | None],
) -> dict[Hashable, SchedulerSnapshot | None]:
    """The snapshots with their engines' step times averaged. Replicas of one deployment
    run one model on alike hardware, and an engine's own estimate can be far off for a
    while (a cold first step; an idle engine's is from its last busy stretch): with its own
    estimate each, a test's idle replica looked slower than one running three generations,
    and got 2 of 16 requests."""
    known = [s for s in snapshots.values() if s is not None]
    if not known:
        return dict(snapshots)
    shared = {
        name: statistics.fmean(getattr(s, name) for s in known)
        for name in ("decode_s", "prefill_base_s", "prefill_s_per_token")
    }
    return {r: s and dataclasses.replace(s, **shared) for r, s in snapshots.items()}
