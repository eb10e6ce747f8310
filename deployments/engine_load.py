"""One replica's engine load, as the request router and the autoscaler read it.

A TGIServer replica reads its launcher's `/metrics` (TGI's metric names, which the
embedded engine and real TGI both export) into an `EngineLoad`, and hands Serve:
- `to_routing_stats()` from `record_routing_stats` (the controller polls it every
  `request_routing_stats_period_s` and broadcasts it to every handle's router);
- `to_autoscaling_stats()` from `record_autoscaling_stats` (custom metrics the
  controller aggregates for the autoscaling policy).

The dict keys are defined here and nowhere else: `from_routing_stats` reads what
`to_routing_stats` wrote.
"""

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from deployments.autoscaling import ENGINE_BATCH_TOKEN_USAGE, ENGINE_QUEUED_REQUESTS

# EngineLoad field ← the engine's gauge. Real TGI exports the first four; the KV block
# gauges are the embedded engine's own (absent under real TGI, so those fields are None).
# No engine exports the tokens of queued requests yet; the router estimates them.
_GAUGES = {
    "num_queued": "tgi_queue_size",
    "num_running": "tgi_batch_current_size",
    "num_batch_max_tokens": "tgi_batch_current_max_tokens",
    "max_batch_total_tokens": "tgi_batch_max_total_tokens",
    "num_queued_tokens": "ray_tgi_queue_tokens",
    "num_free_blocks": "ray_tgi_kv_blocks_free",
    "num_total_blocks": "ray_tgi_kv_blocks_total",
}
_GAUGE_NAMES = frozenset(_GAUGES.values())
_REQUIRED = ("num_queued", "num_running", "num_batch_max_tokens")


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of one engine's batch and queue, taken at `reported_at`."""

    num_queued: int  # requests waiting for a batch
    num_running: int  # requests in the running batch
    num_batch_max_tokens: int  # tokens the running batch may grow to (prompt + max_new each)
    reported_at: float  # time.time() on the replica when the engine was read
    max_batch_total_tokens: int | None = None  # KV cache capacity in tokens
    num_queued_tokens: int | None = None  # prompt + max_new tokens of the queued requests
    num_free_blocks: int | None = None  # paged KV cache blocks free
    num_total_blocks: int | None = None

    @property
    def kv_used_fraction(self) -> float | None:
        """Share of the KV cache blocks in use, if the engine reports its blocks."""
        if self.num_free_blocks is None or not self.num_total_blocks:
            return None
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def batch_token_usage(self) -> float | None:
        """The running batch's reserved tokens over the KV capacity (0..1, TGI's
        admission budget)."""
        if not self.max_batch_total_tokens:
            return None
        return self.num_batch_max_tokens / self.max_batch_total_tokens

    @classmethod
    def from_metrics_text(cls, text: str, reported_at: float | None = None) -> "EngineLoad":
        """Read the gauges from an engine's Prometheus `/metrics` text. ValueError if a
        required one (queue size, batch size, batch max tokens) is missing."""
        # Only a few unlabelled `name value` lines matter: picking them out takes 0.1 ms,
        # where prometheus-client's parser took 7 ms of the replica's event loop for the
        # embedded engine's ~700 lines of histograms, every routing-stats period.
        values: dict[str, float] = {}
        for line in text.splitlines():
            name, _, rest = line.partition(" ")
            if name in _GAUGE_NAMES and rest:
                values[name] = float(rest.split()[0])
        missing = [_GAUGES[f] for f in _REQUIRED if _GAUGES[f] not in values]
        if missing:
            raise ValueError(f"engine /metrics lacks {', '.join(missing)}")
        found = {f: int(values[g]) for f, g in _GAUGES.items() if g in values}
        return cls(**found, reported_at=time.time() if reported_at is None else reported_at)

    def to_routing_stats(self) -> dict[str, Any]:
        """What `record_routing_stats` returns."""
        return asdict(self)

    @classmethod
    def from_routing_stats(cls, stats: dict[str, Any]) -> "EngineLoad | None":
        """Read `to_routing_stats()` back; None for a replica that has not reported yet
        (Serve gives `{}`) or reported something else."""
        try:
            return cls(**{f.name: stats[f.name] for f in fields(cls) if f.name in stats})
        except TypeError:  # a required key is missing
            return None

    def to_autoscaling_stats(self) -> dict[str, float]:
        """What `record_autoscaling_stats` returns (Serve accepts only int/float values)."""
        stats = {ENGINE_QUEUED_REQUESTS: float(self.num_queued)}
        if self.batch_token_usage is not None:
            stats[ENGINE_BATCH_TOKEN_USAGE] = self.batch_token_usage
        return stats
