"""Server-sent events as TGI writes them."""

import json
from collections.abc import AsyncGenerator, Callable

from fastapi.responses import StreamingResponse


def sse_event(data: dict | str) -> str:
    """One event: `data:` then the JSON (or a literal such as [DONE]), then a blank line."""
    return f"data:{data if isinstance(data, str) else json.dumps(data)}\n\n"


class _SSEResponse(StreamingResponse):
    """An event stream that calls `on_close` exactly once however it ends: finished, failed,
    or the client gone before the first event (when the generator's own `finally` would
    never run, because it never started)."""

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # runs the generator's cleanup if it started
            self._on_close()


def sse_response(
    events: AsyncGenerator[str, None], on_close: Callable[[], None] = lambda: None
) -> StreamingResponse:
    return _SSEResponse(events, on_close)
