"""Server-sent events as TGI writes them."""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse


def sse_event(data: dict | str) -> str:
    """One event: `data:` then the JSON (or a literal such as [DONE]), then a blank line."""
    return f"data:{data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")
