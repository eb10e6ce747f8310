"""What the ingress checks before any route runs, as one ASGI middleware: the body's size
(413), the API key (401), the key's rate and concurrency (429 with Retry-After), and the
request's deadline (504, or an error event once a stream has started). Errors are in TGI's
shape, `{"error": ..., "error_type": ...}`.

The middleware is added to the ingress's FastAPI app at import; its settings come from the
ingress replica serving the request (Serve's `servable_object`, the same lookup Serve's
class-based views make), which builds them from the app config when it starts.
"""

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ray import serve
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.api_keys import APIKeys
from serve_app.config import IngressOptions

SSE_MEDIA_TYPE = b"text/event-stream"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class GuardPolicy:
    api_keys: APIKeys | None  # None: no key needed
    max_body_bytes: int
    request_timeout_s: float | None

    @classmethod
    def from_options(
        cls, options: IngressOptions, environ: Mapping[str, str] | None = None
    ) -> "GuardPolicy":
        """Read the keys (from `environ`, default os.environ, for `key_env`) now."""
        environ = os.environ if environ is None else environ
        keys = APIKeys(options.auth, environ) if options.auth is not None else None
        return cls(keys, options.max_body_bytes, options.request_timeout_s)


def replica_policy() -> GuardPolicy | None:
    """The policy of the ingress replica that serves this request."""
    return getattr(serve.get_replica_context().servable_object, "guard_policy", None)


class RequestGuard:
    def __init__(self, app: ASGIApp, policy: Callable[[], GuardPolicy | None] = replica_policy):
        self.app = app
        self._policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self._policy() if scope["type"] == "http" else None
        if policy is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        receive_body = await _body_within(scope, receive, headers, policy.max_body_bytes)
        if receive_body is None:
            await _error(scope, receive, send, 413, "payload_too_large",
                         f"Payload too large: the limit is {policy.max_body_bytes} bytes "
                         "(ingress.max_body_bytes)")  # fmt: skip
            return
        keys, holder = policy.api_keys, None
        if keys is not None and not _is_open(scope["method"], _route_path(scope), keys.open_paths):
            holder = keys.authenticate(headers.get("authorization"))
            if holder is None:
                await _error(scope, receive, send, 401, "unauthorized", "Unauthorized",
                             {"WWW-Authenticate": "Bearer"})  # fmt: skip
                return
            refusal = keys.admit(holder)
            if refusal is not None:
                await _error(scope, receive, send, 429, "rate_limited", refusal.message,
                             {"Retry-After": str(refusal.retry_after_s)})  # fmt: skip
                return
            scope.setdefault("state", {})["api_key_name"] = holder.name  # for logs
        try:
            await _within(policy.request_timeout_s, self.app, scope, receive_body, send)
        finally:
            if holder is not None:
                keys.release(holder)


def _route_path(scope: Scope) -> str:
    """The path the routes see: without the app's route prefix (Serve's root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _is_open(method: str, path: str, open_paths: frozenset[str]) -> bool:
    """Open paths, also under a model's prefix; and the chat page, which is static."""
    if method == "GET" and (path == "/" or path.startswith("/static/")):
        return True
    if path.startswith("/models/"):
        _, _, rest = path[len("/models/") :].partition("/")
        path = "/" + rest
    return path in open_paths


async def _body_within(
    scope: Scope, receive: Receive, headers: Headers, limit: int
) -> Receive | None:
    """`receive` if the body is within `limit` bytes, else None. A declared length is
    trusted (the HTTP server holds the client to it); a chunked body is read here first."""
    length = headers.get("content-length")
    if length is not None:
        return receive if not length.isdigit() or int(length) <= limit else None
    if scope["method"] not in _BODY_METHODS:
        return receive
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left: let the app see it
            return _replay([message], receive)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return _replay([{"type": "http.request", "body": b"".join(chunks)}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed


async def _within(
    timeout_s: float | None, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run the app; past `timeout_s`, cancel it and end the response in TGI's shape."""
    if timeout_s is None:
        await app(scope, receive, send)
        return
    started, streaming, ended = False, False, False

    async def watched(message: Message) -> None:
        nonlocal started, streaming, ended
        if message["type"] == "http.response.start":
            started = True
            streaming = (
                Headers(raw=message["headers"])
                .get("content-type", "")
                .startswith(SSE_MEDIA_TYPE.decode())
            )
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            ended = True
        await send(message)

    try:
        async with asyncio.timeout(timeout_s):
            await app(scope, receive, watched)
    except TimeoutError:
        message = f"Request timed out after {timeout_s:g} s (ingress.request_timeout_s)"
        if not started:
            await _error(scope, receive, send, 504, "timeout", message)
        elif not ended:  # a stream: its last event says why it ends
            event = b"" if not streaming else _event({"error": message, "error_type": "timeout"})
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": event, "more_body": False})


def _event(body: dict) -> bytes:
    return f"data:{json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    body = {"error": message, "error_type": error_type}
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
