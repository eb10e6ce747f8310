"""join_ready: items pass at once, those that came while the reader was busy are joined."""

import asyncio
import itertools

import pytest

from deployments.coalesce import MAX_INTERVAL_S, MessageBudget, join_ready


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
        async for text in join_ready(ticking(), lambda: 0.03):
            received.append((loop.time() - started, text))
        return received

    received = asyncio.run(main())
    assert received[0][1] == "e0 " and received[0][0] < 0.02
    assert "".join(text for _, text in received) == "".join(f"e{i} " for i in range(10))
    assert len(received) <= 4  # ~50 ms of text at most every 30 ms, instead of 10 messages
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(received)]
    assert all(gap >= 0.029 for gap in gaps[:-1])  # the last goes when the source ends


def test_the_budget_interval_grows_with_the_streams_open_and_is_capped():
    budget = MessageBudget(messages_per_s=400)
    gate = asyncio.Event()

    async def waiting_source():
        yield "e0"
        await gate.wait()
        yield "e1"

    async def main():
        intervals = [budget.interval_s()]  # none open
        streams = [budget.join(waiting_source()) for _ in range(3)]
        firsts = [await stream.__anext__() for stream in streams]
        intervals.append(budget.interval_s())  # three open
        await streams[0].aclose()  # a stream left early is no longer counted
        intervals.append(budget.interval_s())
        gate.set()
        rests = [[text async for text in stream] for stream in streams[1:]]
        intervals.append(budget.interval_s())  # all ended
        many = MessageBudget(messages_per_s=400)
        many.num_open = 1000
        return firsts, rests, intervals, many.interval_s()

    firsts, rests, intervals, capped = asyncio.run(main())
    assert firsts == ["e0"] * 3 and rests == [["e1"], ["e1"]]
    assert intervals == [0, 3 / 400, 2 / 400, 0]
    assert capped == MAX_INTERVAL_S
    assert MessageBudget(messages_per_s=0).interval_s() == 0  # 0: no interval however many


def test_the_last_text_is_not_held_back_by_the_interval():
    async def short():
        for i in range(3):
            yield f"e{i} "
            await asyncio.sleep(0.005)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = [text async for text in join_ready(short(), lambda: 5.0)]
        return received, loop.time() - started

    received, took_s = asyncio.run(main())
    assert received == ["e0 ", "e1 e2 "]  # the first at once, the rest when the source ends
    assert took_s < 1.0  # not the 5 s interval
