"""GET /stats: for each model, its replicas (Serve's view) and its engine's queue (TGI's).

Replica counts come from `serve.status()`, which works inside a replica (it asks the Serve
controller). The queue comes from the engines' own Prometheus gauges, TGI's names:
`tgi_queue_size` (requests waiting for a batch) and `tgi_batch_current_size` (requests in
the running batch), read from every running replica (`handle.broadcast`, through
deployments/replica_metrics.py): a model's numbers are the sums, and `replicas` lists each
replica's own.
"""

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeStatus

from deployments.replica_metrics import ENGINE_TIMEOUT_S, scrape_model

_ENGINE_GAUGES = {"tgi_queue_size": "queued_requests", "tgi_batch_current_size": "running_requests"}


class AppStats:
    """The /stats answer for an app's models (`{name: TGIServer handle}`, first first)."""

    def __init__(self, models: dict[str, DeploymentHandle]):
        self._models = models
        self._model_ids: dict[str, str] = {}  # from each engine's /info, once it answered

    async def collect(self) -> dict[str, Any]:
        status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
        entries = await asyncio.gather(*(self._model(name, status) for name in self._models))
        return {"models": list(entries)}

    async def _model(self, name: str, status: ServeStatus) -> dict[str, Any]:
        server = self._models[name]
        entry: dict[str, Any] = {"name": name, "deployment": server.deployment_name}
        entry.update(replica_counts(status, server.app_name, server.deployment_name))
        try:
            model_id = await asyncio.wait_for(self._model_id(name), ENGINE_TIMEOUT_S)
        except Exception as exc:  # one model down must not hide the others' numbers
            error = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, TimeoutError):
                error = f"the engine did not answer within {ENGINE_TIMEOUT_S:g} s"
            return {**entry, "model_id": self._model_ids.get(name), "error": error}
        scrape = await scrape_model(name, server, ENGINE_TIMEOUT_S)
        replicas = [{"replica_id": r.replica_id, **engine_queue(r.text)} for r in scrape.replicas]
        totals = {
            key: sum(r.get(key, 0) for r in replicas)
            for key in ("queued_requests", "running_requests")
        }
        entry = {**entry, "model_id": model_id, **totals, "replicas": replicas}
        if scrape.errors:
            entry["error"] = "; ".join(scrape.errors)
        return entry

    async def _model_id(self, name: str) -> str:
        if name not in self._model_ids:
            info = await self._models[name].call.remote("GET", "/info")
            self._model_ids[name] = str(json.loads(info.body).get("model_id") or "")
        return self._model_ids[name]


def engine_queue(metrics_text: str) -> dict[str, int]:
    """`{"queued_requests": n, "running_requests": n}` from an engine's /metrics text."""
    found: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        key = _ENGINE_GAUGES.get(family.name)
        if key is not None and family.samples:
            found[key] = int(sum(sample.value for sample in family.samples))
    return found


def replica_counts(status: ServeStatus, app_name: str, deployment_name: str) -> dict[str, Any]:
    """The deployment's status and its replicas by state (RUNNING, STARTING, ...)."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app is not None else None
    if deployment is None:
        return {"status": "NOT_FOUND", "running_replicas": 0, "replica_states": {}}
    # The states are str enums: `.value` is the plain name a JSON answer needs.
    states = {_plain(state): n for state, n in deployment.replica_states.items()}
    return {
        "status": _plain(deployment.status),
        "running_replicas": states.get("RUNNING", 0),
        "replica_states": states,
    }


def _plain(value: object) -> str:
    return str(getattr(value, "value", value))
