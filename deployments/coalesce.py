"""Fewer, larger messages through Ray Serve's hops when token streams are fast.

Each item a Serve deployment streams (TGIServer → ingress → proxy) is a message of its own,
whatever its size, and those hops carry about 1,500 messages a second: with one message per
token, 32 streams on an H200 got 37.7–41.5 % of the engine's tokens through Serve.
`join_ready` joins the items that queued up while the last one was on its way, and with a
least interval between two messages those that came within it. A fixed interval held back
short answers at one stream; `MessageBudget` makes it grow with the streams open at once
(500 messages a second: 76–87 % kept at 32 streams, nothing added at one; docs/benchmarks.md).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class _End:
    """Put after the source's last item."""


# A stream still shows its text ten times a second, however many streams share the budget.
MAX_INTERVAL_S = 0.1


class MessageBudget:
    """Messages a second that the streams open through it share: with n open, each stream's
    messages are n / messages_per_s apart at least (at most MAX_INTERVAL_S); 0: no interval."""

    def __init__(self, messages_per_s: float):
        self.messages_per_s = messages_per_s
        self.num_open = 0

    def interval_s(self) -> float:
        if not self.messages_per_s:
            return 0
        return min(self.num_open / self.messages_per_s, MAX_INTERVAL_S)

    async def join(self, items: AsyncIterator[T]) -> AsyncIterator[T | str]:
        """`join_ready(items)` with this budget's interval, counted open while it runs."""
        self.num_open += 1
        try:
            async for item in join_ready(items, self.interval_s):
                yield item
        finally:
            self.num_open -= 1


def _no_interval() -> float:
    return 0


async def join_ready(
    items: AsyncIterator[T], min_interval_s: Callable[[], float] = _no_interval
) -> AsyncIterator[T | str]:
    """`items` in order, each run of strings that arrived since the last yield joined into
    one; other items pass alone. Text follows text no sooner than `min_interval_s()`, asked
    anew before each message, except the first (at once) and the last (as soon as the
    source ends). An error of the source is raised after the items before it. The source
    runs in a task of its own from start to end (context managers it holds open across
    items stay in one task); closing this generator early cancels it."""
    ready: asyncio.Queue[T | BaseException | _End] = asyncio.Queue()
    source_done = asyncio.Event()
    loop = asyncio.get_running_loop()
    text_sent_at: float | None = None

    async def read() -> None:
        try:
            async for item in items:
                ready.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there
            ready.put_nowait(exc)
        else:
            ready.put_nowait(_End())
        source_done.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            if (
                text_sent_at is not None
                and (wait := text_sent_at + min_interval_s() - loop.time()) > 0
            ):
                # The stream's last text is not held back: a client waiting for a whole
                # answer (or a closed loop of them) would wait for it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(source_done.wait(), wait)
            batch = [await ready.get()]
            while not ready.empty():
                batch.append(ready.get_nowait())
            for run in _runs_of_strings(batch):
                if isinstance(run, str):
                    text_sent_at = loop.time()
                yield run
            if isinstance(last := batch[-1], BaseException):
                raise last
            if isinstance(last, _End):
                return
    finally:
        # Cancelling the reader while it awaits the source raises CancelledError inside
        # the source, whose cleanup (closing the engine's HTTP stream) runs then.
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _runs_of_strings(batch: list) -> Iterator:
    """The batch's items, consecutive strings joined, without the end marker or error."""
    texts: list[str] = []
    for item in batch:
        if isinstance(item, str):
            texts.append(item)
            continue
        if texts:
            yield "".join(texts)
            texts = []
        if not isinstance(item, BaseException | _End):
            yield item
    if texts:
        yield "".join(texts)
