"""TGIServer: one Serve replica in front of one launcher process.

The replica starts the launcher (embedded engine or real TGI, same flags), waits until its
/health answers, lets Serve health-check it, and forwards requests to it over localhost
HTTP. Request bodies pass through untouched, so TGI semantics (a missing `max_new_tokens`,
`details` defaulting to false, ...) are the engine's, not re-encoded here.
"""

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx

from deployments.errors import TGIError
from deployments.launcher import Launcher, embedded_env, free_port, launcher_command
from serve_app.config import ModelConfig

# TGI's default --max-concurrent-requests.
_DEFAULT_MAX_CONCURRENT_REQUESTS = 128

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class TGIServer:
    """Serve deployment class; compose with
    `serve.deployment(TGIServer, **TGIServer.get_deployment_options(cfg)).bind(cfg)`."""

    @classmethod
    def get_deployment_options(cls, model_cfg: ModelConfig) -> dict[str, Any]:
        """Serve options for this model's deployment (pure: tests assert it without Ray).

        All shards of a replica are child processes of the replica actor, so the actor
        itself reserves every shard's GPUs: Ray then places them on one node and lists
        them all in CUDA_VISIBLE_DEVICES, which the launcher inherits.
        """
        d = model_cfg.deployment
        max_concurrent = (
            model_cfg.launcher_args.max_concurrent_requests or _DEFAULT_MAX_CONCURRENT_REQUESTS
        )
        actor_options: dict[str, Any] = {"num_cpus": model_cfg.resources.num_cpus}
        num_gpus = model_cfg.resources.num_gpus * model_cfg.num_shard
        if num_gpus:
            actor_options["num_gpus"] = num_gpus
        return {
            "name": f"TGIServer:{model_cfg.name}",
            "num_replicas": d.num_replicas,
            # Let the engine's continuous batching see as many requests as it admits.
            "max_ongoing_requests": d.max_ongoing_requests or max_concurrent,
            "ray_actor_options": actor_options,
            "health_check_period_s": d.health_check_period_s,
            "health_check_timeout_s": d.health_check_timeout_s,
            "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        }

    async def __init__(self, model_cfg: ModelConfig, command: Sequence[str] | None = None):
        """Start the launcher and wait until it is healthy.

        `command` replaces the launcher command line built from `model_cfg` (tests run a
        stand-in server this way); `--hostname/--port` are appended either way.
        """
        self.model_cfg = model_cfg
        if command is None:
            flags = model_cfg.launcher_argv()
            if model_cfg.engine == "tgi" or model_cfg.num_shard > 1:
                # Distinct per replica, so several launchers can share a node.
                flags += ["--master-port", str(free_port())]
                flags += ["--shard-uds-path", f"/tmp/ray-tgi-{model_cfg.name}-{free_port()}"]
            command = launcher_command(model_cfg.engine, flags)
        env = embedded_env() if model_cfg.engine == "embedded" else None
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
        # No read timeout: a long generation is bounded by max_new_tokens, not by a clock,
        # and a disconnected client cancels the call. No pool limit: Serve's
        # max_ongoing_requests already bounds the requests in flight.
        self._client = httpx.AsyncClient(
            base_url=self._launcher.url,
            timeout=httpx.Timeout(10.0, read=None, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    # --- TGI routes -------------------------------------------------------------------

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST /generate; returns the GenerateResponse."""
        return await self._post_json("/generate", request)

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /generate_stream; yields each StreamResponse as it arrives."""
        async with aclosing(self._stream_data("/generate_stream", request)) as events:
            async for data in events:
                payload = json.loads(data)
                if "error" in payload and "token" not in payload:
                    raise TGIError.from_payload(200, payload)  # an error inside the stream
                yield payload

    async def openai(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        """POST an OpenAI route (`/v1/chat/completions`, `/v1/completions`) without
        streaming; returns the completion object."""
        return await self._post_json(_openai_path(path), request)

    async def openai_stream(self, path: str, request: dict[str, Any]) -> AsyncIterator[str]:
        """POST an OpenAI route with `stream: true`; yields each SSE event verbatim (the
        engine's own `data: [DONE]` and error events included)."""
        async with aclosing(self._stream_data(_openai_path(path), request)) as events:
            async for data in events:
                yield f"data: {data}\n\n"

    async def info(self) -> dict[str, Any]:
        """GET /info."""
        response = await self._client.get("/info")
        _raise_for_error(response.status_code, response.content)
        return response.json()

    # --- health and lifecycle ---------------------------------------------------------

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising marks the replica unhealthy."""
        self._launcher.raise_if_exited()
        response = await self._client.get("/health", timeout=10.0)
        if response.status_code != 200:
            raise RuntimeError(f"launcher /health answered {response.status_code}")

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

    # --- transport ----------------------------------------------------------------------

    async def _post_json(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        response = await self._client.post(path, json=request)
        _raise_for_error(response.status_code, response.content)
        return response.json()

    async def _stream_data(self, path: str, request: dict[str, Any]) -> AsyncIterator[str]:
        """The `data:` payloads of an SSE response, one per event.

        Leaving this generator early (the caller is cancelled, or closes it) exits the
        `async with`, which closes the connection, which is how the engine learns to stop.
        """
        async with self._client.stream("POST", path, json=request) as response:
            if response.status_code != 200:
                _raise_for_error(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    yield line[len("data:") :].strip()


def _openai_path(path: str) -> str:
    if path not in OPENAI_PATHS:
        raise ValueError(f"not an OpenAI route: {path!r}")
    return path


def _raise_for_error(status_code: int, body: bytes) -> None:
    if status_code == 200:
        return
    try:
        payload: object = json.loads(body)
    except ValueError:
        payload = body.decode("utf-8", errors="replace")
    raise TGIError.from_payload(status_code, payload)
