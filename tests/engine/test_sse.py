"""SSE keep-alive: a comment fills every silence longer than the interval; nothing is lost."""

import asyncio

from engine.sse import KEEPALIVE_COMMENT, with_keepalive


async def slow_events(closed: list[str]):
    try:
        yield "data:1\n\n"
        await asyncio.sleep(0.35)  # silence: about three keep-alive intervals
        yield "data:2\n\n"
    finally:
        closed.append("events")


def test_keepalive_comments_fill_silences_and_events_pass_unchanged():
    async def scenario():
        closed: list[str] = []
        out = [e async for e in with_keepalive(slow_events(closed), interval_s=0.1)]
        return out, closed

    out, closed = asyncio.run(scenario())
    assert out[0] == "data:1\n\n" and out[-1] == "data:2\n\n"
    assert 2 <= out.count(KEEPALIVE_COMMENT) <= 4 and len(out) == out.count(KEEPALIVE_COMMENT) + 2
    assert closed == ["events"]


def test_closing_while_waiting_closes_the_events():
    async def scenario():
        closed: list[str] = []
        stream = with_keepalive(slow_events(closed), interval_s=10)
        assert await anext(stream) == "data:1\n\n"
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)  # the wrapper now waits on the slow event
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await stream.aclose()
        return closed

    assert asyncio.run(scenario()) == ["events"]
