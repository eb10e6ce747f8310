"""GET /metrics: the whole app in one scrape.

First the ingress's own metrics (deployments/ingress_metrics.py), then every replica's
engine metrics (TGI's `tgi_*` names, plus the embedded engine's `ray_tgi_*` KV cache and
prefix cache ones) with `model` and `replica` labels (deployments/replica_metrics.py).
`/models/{name}/metrics` is the same for one model: the ingress's series of that model and
its replicas' engine metrics.

The ingress's metrics are one ingress replica's (the one the scrape reached): with several
ingress replicas, read them from Ray's metrics instead, where Serve labels each replica.
"""

import asyncio
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from ray.serve.handle import DeploymentHandle

from deployments.ingress_metrics import IngressMetrics
from deployments.replica_metrics import relabeled_text, scrape_model


class AppMetrics:
    """The /metrics answer for an app's models (`{name: TGIServer handle}`)."""

    def __init__(self, models: dict[str, DeploymentHandle], ingress: IngressMetrics):
        self._models = models
        self._ingress = ingress

    async def render(self, only: str | None = None) -> bytes:
        """The Prometheus text of the whole app, or of the model named `only`."""
        names = list(self._models) if only is None else [only]
        scrapes = await asyncio.gather(*(scrape_model(n, self._models[n]) for n in names))
        for scrape in scrapes:
            self._ingress.engine_replicas.labels(scrape.model).set(len(scrape.replicas))
            if scrape.errors:
                self._ingress.engine_scrape_errors.labels(scrape.model).inc(len(scrape.errors))
        own = generate_latest(_OfModels(self._ingress.registry, names if only else None))
        engines = relabeled_text([replica for s in scrapes for replica in s.replicas])
        return own + engines.encode()


class _OfModels:
    """A registry's families with only the samples of `models` (all of them if None)."""

    def __init__(self, registry: CollectorRegistry, models: Sequence[str] | None):
        self._registry = registry
        self._models = None if models is None else set(models)

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            if self._models is not None:
                kept = [s for s in family.samples if s.labels.get("model") in self._models]
                family.samples = kept
            yield family
