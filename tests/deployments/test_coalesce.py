"""join_ready: items pass at once, those that came while the reader was busy are joined."""

import asyncio
import itertools

import pytest

from deployments.coalesce import join_ready


async def _source(items, gates: dict[int, asyncio.Event] | None = None, log=None):
    try:
        for i, item in enumerate(items):
            if gates and i in gates:
                await gates[i].wait()
            yield item
    finally:
        if log is not None:
            log.append("source closed")


def test_a_reader_that_keeps_up_gets_every_item_alone():
    async def main():
        gates = {i: asyncio.Event() for i in range(1, 4)}
        received = []
        async for text in join_ready(_source(["a", "b", "c", "d"], gates)):
            received.append(text)
            if len(received) < 4:
                gates[len(received)].set()
        return received

    assert asyncio.run(main()) == ["a", "b", "c", "d"]


def test_items_that_came_while_the_reader_was_busy_are_joined_in_order():
    async def main():
        headers = {"x-compute-type": "cpu"}
        received = []
        async for item in join_ready(_source([headers, "e1", "e2", "e3"])):
            received.append(item)
            await asyncio.sleep(0.01)  # busy: the source runs ahead meanwhile
        return received

    assert asyncio.run(main()) == [{"x-compute-type": "cpu"}, "e1e2e3"]


def test_an_error_of_the_source_comes_after_the_items_before_it():
    async def failing():
        yield "e1"
        yield "e2"
        raise ValueError("engine gone")

    async def main():
        received = []
        with pytest.raises(ValueError, match="engine gone"):
            async for text in join_ready(failing()):
                received.append(text)
        return received

    assert "".join(asyncio.run(main())) == "e1e2"


def test_closing_early_closes_the_source():
    async def main():
        log = []
        never = asyncio.Event()
        joined = join_ready(_source(["e1", "e2"], {1: never}, log))
        assert await anext(joined) == "e1"
        await joined.aclose()  # the client went away while the source waits for a token
        return log

    assert asyncio.run(main()) == ["source closed"]


def test_with_a_least_interval_text_goes_first_at_once_then_together():
    async def ticking():
        for i in range(10):
            yield f"e{i} "
            await asyncio.sleep(0.005)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = []
        async for text in join_ready(ticking(), min_interval_s=0.03):
            received.append((loop.time() - started, text))
        return received

    received = asyncio.run(main())
    assert received[0][1] == "e0 " and received[0][0] < 0.02
    assert "".join(text for _, text in received) == "".join(f"e{i} " for i in range(10))
    assert len(received) <= 4  # ~50 ms of text at most every 30 ms, instead of 10 messages
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(received)]
    assert min(gaps) >= 0.029
