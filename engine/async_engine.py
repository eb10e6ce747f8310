"""Runs the engine loop in one background thread and streams each request's tokens to asyncio.

`LLMEngine` is single-threaded, so every call into it happens on the loop thread: callers
only post commands (add, abort) and read from their own asyncio queue. Torch releases the GIL
during the forward pass, so the HTTP event loop stays responsive while a step runs.

The thread that serves HTTP runs no torch op at all: torch work before the loop starts
(converting and loading weights) goes through `on_own_thread`.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from engine.forecast import SchedulerSnapshot, StepTimes, take_snapshot
from engine.llm_engine import EngineStats, LLMEngine
from engine.metrics import EngineMetrics
from engine.protocol import SamplingParams, TokenStep

log = logging.getLogger(__name__)

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` run on a thread that ends with it: its result, or its exception raised.

    Torch runs CPU ops on an OpenMP team per calling thread, and libgomp keeps a thread's
    team until that thread ends. With a second team alive (the loading thread's, next to
    the engine loop's) a small machine has more OpenMP threads than cores, and libgomp then
    stops spinning between parallel regions, so every op of every step waits for its
    workers to wake: on the 2-core CPU machine SmolLM2 took 61 ms a decode step with its
    weights loaded on the main thread, 40-42 ms loaded on a thread that had ended.
    """
    # Leaving the block shuts the pool down, which joins its one thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-work") as pool:
        return pool.submit(fn, *args).result()


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of (TokenStep, step start) | BaseException

    def put(self, item: tuple[TokenStep, float] | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self.stats: EngineStats = engine.stats()  # refreshed by the loop thread after each step
        self.error: BaseException | None = None
        self.step_times = StepTimes()  # updated by the loop thread after each step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[tuple[TokenStep, float]]:
        """Yield (token, monotonic start of the engine step that made it) as they come;
        closing early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError(f"engine loop stopped: {self.error!r}")
        request_id = uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._post(("add", request_id, prompt_ids, params))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped the request
                    raise item
                finished = item[0].finish_reason is not None
                yield item
        finally:
            del self._streams[request_id]
            if not finished:
                self._post(("abort", request_id))

    async def snapshot(self) -> SchedulerSnapshot:
        """The scheduler's state between two steps, for forecasts (engine/forecast.py)."""
        if not self.is_alive:
            raise EngineDeadError(f"engine loop stopped: {self.error!r}")
        taken: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("snapshot", taken))
        return await asyncio.wrap_future(taken)

    def shutdown(self) -> None:
        """Stop the loop thread after its current step, then the engine (and its shards)."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _apply_commands(self) -> None:
        while not self._commands.empty():
            command = self._commands.get()
            if command[0] == "snapshot":
                taken = command[1]
                if taken.set_running_or_notify_cancel():  # False: the caller gave up
                    taken.set_result(take_snapshot(self.engine.scheduler, self.step_times))
                continue
            kind, request_id, *rest = command
            if kind == "abort":
                self.engine.abort_request(request_id)
                continue
            try:
                self.engine.add_request(request_id, *rest)
            except ValueError as e:
                self._deliver(request_id, e)

    def _deliver(self, request_id: str, item: tuple[TokenStep, float] | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:  # the caller went away; its abort is already queued
            return
        stream.put(item)

    def _observe_step(self, seconds: float) -> None:
        engine = self.engine
        self.step_times.observe(engine.last_step_was_prefill, engine.last_step_num_tokens, seconds)
        if self.metrics is None:
            return
        method = "prefill" if engine.last_step_was_prefill else "decode"
        self.metrics.batch_inference_count.labels(method=method).inc()
        self.metrics.batch_inference_success.labels(method=method).inc()
        self.metrics.batch_inference_duration.labels(method=method).observe(seconds)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self.stats = self.engine.stats()
                    self._wakeup.wait()
                    continue
                started = time.monotonic()
                steps = self.engine.step()
                self._observe_step(time.monotonic() - started)
                for step in steps:
                    self._deliver(step.request_id, (step, started))
                self.stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine; report it
            log.exception("engine loop failed")
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop failed: {e!r}"))
