"""Stop serving a client that has gone: ASGI middleware that cancels a request's handler when
its client disconnects before the response has ended.

Starlette notices a disconnect only while it streams (StreamingResponse listens for it); a
non-streaming /generate whose client left would run to max_new_tokens and hold its KV blocks
for nobody. TGI's router drops the request's future instead, which aborts it; so does this.
"""

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[Message] = []
        while not body or body[-1].get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nothing to serve
            body.append(message)
        disconnected = asyncio.Event()

        async def app_receive() -> Message:
            if body:
                return body.pop(0)
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        handler = asyncio.ensure_future(self.app(scope, app_receive, send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handler.done():  # the client left (or this request was cancelled)
                handler.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        if not handler.cancelled():
            handler.result()  # re-raise what the app raised
