"""TGIServer: one Serve replica in front of one launcher process.

The replica starts the launcher (embedded engine or real TGI, same flags), waits until its
/health answers, lets Serve health-check it, and forwards requests to it over localhost
HTTP. Request bodies pass through untouched, so TGI semantics (a missing `max_new_tokens`,
`details` defaulting to false, ...) are the engine's, not re-encoded here.
"""

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from deployments.autoscaling import EngineQueuePolicy
from deployments.coalesce import MessageBudget
from deployments.engine_load import EngineLoad
from deployments.errors import TGIError
from deployments.first_token_forecast import SCHEDULER_STATS_KEY
from deployments.launcher import Launcher, embedded_env, free_port, launcher_command
from deployments.placement import launcher_env, placement_options, reserve_shard_gpus
from deployments.router import TGI_WAITING_SERVED_RATIO, TGIRequestRouter
from deployments.tokenizer_files import read_tokenizer_files
from deployments.tracing import BACKEND, MODEL_ID, MODEL_NAME, Tracing, hop_span
from deployments.weights_prefetch import prefetch_for_launcher
from serve_app.config import DeploymentOptions, ModelConfig, TracingOptions

# TGI's default --max-concurrent-requests.
_DEFAULT_MAX_CONCURRENT_REQUESTS = 128

# What the ingress may forward to a launcher, by method.
FORWARDED_ROUTES = {
    "POST": frozenset({"/", "/generate", "/generate_stream", "/tokenize", "/chat_tokenize",
                       "/v1/chat/completions", "/v1/completions"}),
    "GET": frozenset({"/info", "/metrics"}),
}  # fmt: skip


@dataclass(frozen=True)
class LauncherReply:
    body: bytes
    content_type: str
    headers: dict[str, str]  # TGI's x-* headers (x-compute-time, x-generated-tokens, ...)


class TGIServer:
    """Serve deployment class; compose with
    `serve.deployment(TGIServer, **TGIServer.get_deployment_options(cfg)).bind(cfg)`."""

    @classmethod
    def get_deployment_options(cls, model_cfg: ModelConfig) -> dict[str, Any]:
        """Serve options for this model's deployment (pure: tests assert it without Ray).

        The replica actor takes the first shard's resources; with num_shard > 1 a
        STRICT_PACK placement group of one bundle per shard reserves the rest on the same
        node (deployments/placement.py).
        """
        d = model_cfg.deployment
        max_concurrent = (
            model_cfg.launcher_args.max_concurrent_requests or _DEFAULT_MAX_CONCURRENT_REQUESTS
        )
        actor_options: dict[str, Any] = {"num_cpus": model_cfg.resources.num_cpus}
        if model_cfg.resources.num_gpus:
            actor_options["num_gpus"] = model_cfg.resources.num_gpus
        return {
            "name": f"TGIServer:{model_cfg.name}",
            **_replica_options(d, model_cfg.launcher_args.waiting_served_ratio),
            # Let the engine's continuous batching see as many requests as it admits.
            "max_ongoing_requests": d.max_ongoing_requests or max_concurrent,
            "ray_actor_options": actor_options,
            **placement_options(model_cfg),
            "health_check_period_s": d.health_check_period_s,
            "health_check_timeout_s": d.health_check_timeout_s,
            "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
            **({"max_queued_requests": d.max_queued_requests} if d.max_queued_requests else {}),
        }

    async def __init__(
        self,
        model_cfg: ModelConfig,
        command: Sequence[str] | None = None,
        tracing: TracingOptions | None = None,
    ):
        """Start the launcher and wait until it is healthy.

        `command` replaces the launcher command line built from `model_cfg` (tests run a
        stand-in server this way); `--hostname/--port` are appended either way. `tracing`
        on: a span per call, its context passed on to the launcher (`traceparent`).
        """
        self.model_cfg = model_cfg
        self._sse_budget = MessageBudget(model_cfg.deployment.stream_messages_per_s)
        weights_env: dict[str, str] = {}
        self._tracing = Tracing(tracing, component=f"TGIServer:{model_cfg.name}")
        self._span_attributes = {
            BACKEND: model_cfg.engine, MODEL_ID: model_cfg.model_id, MODEL_NAME: model_cfg.name
        }  # fmt: skip
        if command is None:
            flags = model_cfg.launcher_argv()
            if model_cfg.engine == "tgi" or model_cfg.num_shard > 1:
                # Distinct per replica, so several launchers can share a node.
                flags += ["--master-port", str(free_port())]
                flags += ["--shard-uds-path", f"/tmp/ray-tgi-{model_cfg.name}-{os.getpid()}"]
            # Hub weights: one download per node, then the launcher reads the cache offline.
            weights = await asyncio.to_thread(prefetch_for_launcher, model_cfg)
            if weights is not None:
                flags += weights.launcher_flags(flags)
                weights_env = weights.launcher_env()
            command = launcher_command(model_cfg.engine, flags)
        # The holders keep the other shards' GPUs reserved while this replica lives.
        self._gpu_ids, self._shard_holders = await reserve_shard_gpus(model_cfg)
        base_env = embedded_env() if model_cfg.engine == "embedded" else None
        # Secrets (HF_TOKEN from the replica's environment, the API key) reach the launcher
        # only this way: never on its command line, which is logged.
        secrets = model_cfg.launcher_args.secret_env()
        env = launcher_env(base_env, self._gpu_ids) | weights_env | secrets
        self._launcher = Launcher(command, env=env, echo=sys.stderr)
        # Started from the replica's long-lived user thread: the parent-death signal is
        # tied to the thread that forks.
        self._launcher.start()
        try:
            await asyncio.to_thread(
                self._launcher.wait_until_healthy, model_cfg.deployment.startup_timeout_s
            )
        except BaseException:
            self._launcher.stop()
            raise
        # aiohttp rather than httpx: its C parser takes a fifth of httpx's CPU per request
        # and half per streamed event, and this replica handles every token of its engine.
        # No read timeout: a long generation is bounded by max_new_tokens, not by a clock,
        # and a disconnected client cancels the call. No connection limit: Serve's
        # max_ongoing_requests already bounds the requests in flight.
        self._session = aiohttp.ClientSession(
            base_url=self._launcher.url,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            connector=aiohttp.TCPConnector(limit=0),
        )

    # --- requests -------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        request: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> LauncherReply:
        """One request to a forwardable route; the reply as the launcher gave it (body,
        content type, TGI's x-* headers). Non-200 answers raise TGIError."""
        _check_route(method, path)
        with self._launcher_span(method, path, headers) as (span, headers, outcome):
            async with (
                self._launcher_gone_is_an_error(),
                self._session.request(method, path, json=request, headers=headers) as response,
            ):
                body = await response.read()
            if span.is_recording():
                outcome.read_headers(response.headers)
                outcome.read_body(body)
            _raise_for_error(response.status, body)
        return LauncherReply(
            body, response.headers.get("content-type", ""), _tgi_headers(response.headers)
        )

    async def stream(
        self, path: str, request: dict[str, Any], headers: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, str] | str]:
        """POST a streaming route; yields the launcher's x-* headers once it has answered,
        then each SSE event verbatim, as TGI framed it (its error events and the OpenAI
        routes' `data: [DONE]` included).

        Leaving this generator early (the caller is cancelled, or closes it) closes the
        connection, which is how the engine learns to stop.
        """
        _check_route("POST", path)
        with self._launcher_span("POST", path, headers) as (span, headers, outcome):
            async with (
                self._launcher_gone_is_an_error(),
                self._session.post(path, json=request, headers=headers) as reply,
            ):
                if reply.status != 200:
                    _raise_for_error(reply.status, await reply.read())
                finished = False
                try:
                    yield _tgi_headers(reply.headers)
                    outcome.read_headers(reply.headers)
                    async for raw in reply.content:  # one line at a time
                        # Events and keep-alive comments; blank lines only separate them.
                        if line := raw.decode().rstrip("\r\n"):
                            if span.is_recording():
                                outcome.read_event(line)
                            yield f"{line}\n\n"
                    finished = True
                finally:
                    if not finished:
                        reply.close()  # not back to the pool: the engine must see it go

    async def stream_sse(
        self, path: str, request: dict[str, Any], headers: dict[str, str] | None = None
    ) -> AsyncIterator[dict[str, str] | str]:
        """`stream` for the ingress's HTTP routes, where only the bytes matter: the x-*
        headers, then SSE text of one or more whole events per item — those that came while
        the last item was on its way, or within the interval this replica's streams share
        (`deployment.stream_messages_per_s`, deployments/coalesce.py)."""
        async for item in self._sse_budget.join(self.stream(path, request, headers)):
            yield item

    def _launcher_span(self, method: str, path: str, headers: dict[str, str] | None):
        return hop_span(self._tracing.tracer, f"{method} {path}", headers, self._span_attributes)

    @contextlib.asynccontextmanager
    async def _launcher_gone_is_an_error(self) -> AsyncIterator[None]:
        """A connection to the launcher that fails (it was killed, or crashed mid-request)
        becomes a TGI error that says so, instead of an httpx error from deep inside."""
        try:
            yield
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # A killed process closes its sockets a moment before it can be reaped.
            for _ in range(10):
                if (code := self._launcher.returncode) is not None:
                    break
                await asyncio.sleep(0.05)
            state = "did not answer" if code is None else f"exited with status {code}"
            message = f"the engine of this replica {state} ({type(exc).__name__}: {exc}); retry"
            raise TGIError(message, 503, "unavailable") from None

    async def tokenizer_files(self) -> dict[str, bytes]:
        """The model's tokenizer files, read on this replica's node, where the launcher
        found the weights; the ingress counts prompt tokens with them."""
        return await asyncio.to_thread(read_tokenizer_files, self.model_cfg)

    # --- load, for the request router and the autoscaler ----------------------------

    async def engine_metrics(self) -> dict[str, str | None]:
        """This replica's id and its launcher's Prometheus text (`metrics`), or why it has
        none (`error`); the ingress gathers every replica's through `handle.broadcast`."""
        replica_id = serve.get_replica_context().replica_id.unique_id
        try:
            text = await self._engine_metrics_text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"replica_id": replica_id, "metrics": None, "error": f"{exc!r}"[:300]}
        return {"replica_id": replica_id, "metrics": text, "error": None}

    async def _engine_metrics_text(self) -> str:
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with self._session.get("/metrics", timeout=timeout, raise_for_status=True) as reply:
            return await reply.text()

    async def _engine_load(self) -> EngineLoad:
        return EngineLoad.from_metrics_text(await self._engine_metrics_text())

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every routing_stats_period_s; read by deployments/router.py."""
        stats = (await self._engine_load()).to_routing_stats()
        # Real TGI has no scheduler snapshot to give.
        if self.model_cfg.engine == "embedded" and (snapshot := await self._engine_scheduler()):
            stats[SCHEDULER_STATS_KEY] = snapshot
        return stats

    async def _engine_scheduler(self) -> dict[str, Any] | None:
        """The embedded engine's scheduler snapshot (engine/forecast.py); None if this
        launcher does not serve one."""
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with self._session.get("/scheduler", timeout=timeout) as reply:
            return await reply.json() if reply.status == 200 else None

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Polled by Serve; read by deployments/autoscaling.py."""
        return (await self._engine_load()).to_autoscaling_stats()

    async def placement(self) -> dict[str, Any]:
        """Where this replica runs: Ray node, the GPU ids its launcher sees, its launcher."""
        context = serve.get_replica_context()
        return {
            "replica_id": context.replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": self._gpu_ids,
            "launcher_pid": self._launcher.pid,
            "launcher_url": self._launcher.url,
            "launcher_log": str(self._launcher.log_path),
        }

    # --- health and lifecycle ---------------------------------------------------------

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising marks the replica unhealthy."""
        self._launcher.raise_if_exited()
        async with self._session.get("/health", timeout=aiohttp.ClientTimeout(total=10.0)) as r:
            if r.status != 200:
                raise RuntimeError(f"launcher /health answered {r.status}")

    async def health(self) -> bool:
        """Health as a request (for the ingress's GET /health); raises TGIError if unwell."""
        try:
            await self.check_health()
        except Exception as exc:
            raise TGIError(str(exc).splitlines()[0], 503, "healthcheck") from None
        return True

    def __del__(self) -> None:
        # Serve calls __del__ on graceful shutdown; Python may call it again later.
        launcher = getattr(self, "_launcher", None)
        if launcher is not None:
            launcher.stop()
        tracing = getattr(self, "_tracing", None)
        if tracing is not None:
            tracing.shutdown()
        session = getattr(self, "_session", None)
        if session is not None and not session.closed:
            with contextlib.suppress(RuntimeError):  # no loop running: the process is ending
                asyncio.get_running_loop().create_task(session.close())


def _replica_options(d: DeploymentOptions, waiting_served_ratio: float | None) -> dict[str, Any]:
    """How many replicas (fixed, or autoscaled on the engines' queues) and how requests are
    routed among them (the router knows the engines' --waiting-served-ratio)."""
    options: dict[str, Any] = {}
    if d.max_surge_percent is not None:  # new replicas up before old ones stop (blue/green)
        options["max_surge_percent"] = d.max_surge_percent
    if d.autoscaling is None:
        options["num_replicas"] = d.num_replicas or 1
    else:
        a = d.autoscaling
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            downscale_to_zero_delay_s=a.downscale_to_zero_delay_s,
            metrics_interval_s=a.metrics_interval_s,
            look_back_period_s=a.look_back_period_s,
            policy=AutoscalingPolicy(
                policy_function=f"{EngineQueuePolicy.__module__}:{EngineQueuePolicy.__name__}",
                policy_kwargs={
                    "target_queued_per_replica": a.target_queued_per_replica,
                    "target_batch_token_usage": a.target_batch_token_usage,
                },
            ),
        )
    if d.request_router == "batching_aware":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=f"{TGIRequestRouter.__module__}:{TGIRequestRouter.__name__}",
            request_routing_stats_period_s=d.routing_stats_period_s,
            request_router_kwargs={
                "waiting_served_ratio": waiting_served_ratio or TGI_WAITING_SERVED_RATIO
            },
        )
    return options


def _check_route(method: str, path: str) -> None:
    if path not in FORWARDED_ROUTES.get(method, ()):
        raise TGIError(f"{method} {path} is not forwarded to the launcher", 404, "not_found")


def _tgi_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """TGI's x-* headers, keys lower-case."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-")}


def _raise_for_error(status_code: int, body: bytes) -> None:
    if status_code == 200:
        return
    try:
        payload: object = json.loads(body)
    except ValueError:
        payload = body.decode("utf-8", errors="replace")
    raise TGIError.from_payload(status_code, payload)
