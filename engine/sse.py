"""Server-sent events as TGI writes them."""

import asyncio
import json
from collections.abc import AsyncGenerator, Callable

from fastapi.responses import StreamingResponse

# TGI (axum's Sse keep-alive) sends a comment after 15 s without an event, so that proxies
# and clients with idle timeouts keep a slow stream (a long prefill, a full queue) open.
KEEPALIVE_INTERVAL_S = 15.0
KEEPALIVE_COMMENT = ":\n\n"


def sse_event(data: dict | str) -> str:
    """One event: `data:` then the JSON (or a literal such as [DONE]), then a blank line."""
    return f"data:{data if isinstance(data, str) else json.dumps(data)}\n\n"


class _SSEResponse(StreamingResponse):
    """An event stream that calls `on_close` exactly once however it ends: finished, failed,
    or the client gone before the first event (when the generator's own `finally` would
    never run, because it never started)."""

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]):
        self._events = with_keepalive(events, KEEPALIVE_INTERVAL_S)
        super().__init__(self._events, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # runs the generator's cleanup if it started
            self._on_close()


async def with_keepalive(
    events: AsyncGenerator[str, None], interval_s: float
) -> AsyncGenerator[str, None]:
    """`events`, with a keep-alive comment whenever none comes for `interval_s`."""
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE_COMMENT
                continue
            pending, finished = None, done.pop()
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:  # closed while waiting: stop the wait, then the events
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()


def sse_response(
    events: AsyncGenerator[str, None], on_close: Callable[[], None] = lambda: None
) -> StreamingResponse:
    return _SSEResponse(events, on_close)
