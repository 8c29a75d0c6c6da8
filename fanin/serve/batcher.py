"""``Batcher``: dynamic batching on an asyncio event loop.

Each request hands its rows to ``await batcher.predict(x)``. One background task takes the queued
requests in arrival order, up to ``max_batch`` rows (a single larger request runs alone), stacks them
into one array and runs ``predict`` on it in a thread executor (the kernels release the GIL, so the
event loop keeps reading requests meanwhile); each caller then gets exactly its own rows of the
result. A batch waits for company, at most until ``max_wait_ms`` after its oldest request arrived, while
it holds fewer rows than the previous batch did (``max_batch`` for the first): under steady concurrency
(N clients each waiting for its answer) it leaves as soon as the N are back, and a lone client does not
pay the wait on every request. Batches run one after another: while one runs, the next fills up, so a
busy server batches even with ``max_wait_ms = 0``. ``max_batch = 1`` turns batching off (each request
is its own predict call).

With batching on, a predict call expected to take at most ``inline_ms``, made when no other request waits
for an answer, runs on the event-loop thread itself. Handing a call to the executor thread and getting its
answer back costs two thread wake-ups, ~0.1 ms a round trip on the 2-core machine of bench/RESULTS.md: as
long as the whole call of an 8-row batch of the SRigL-90 % MLP, so when every client waits on that batch,
the hand-off, not the model, is what the loop waits for (docs/SERVING.md has the numbers). Calls made while
other requests wait (queued for the next batch) and longer calls still go to the executor, so the loop
keeps reading and answering requests while the model runs. With batching off every call goes to the
executor: the loop cannot see the requests still unread in its sockets, and calls run one by one on the
loop cost ONNX Runtime's per-request server 5-7 % of its requests/s at 8 connections. The expected time is
the running mean of the measured times of calls of the same size class (rows rounded up to a power of
two); a size class not seen yet runs in the executor once to be measured. ``inline_ms = 0`` turns this off.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import numpy as np

__all__ = ["Batcher"]


class Batcher:
    """Stacks the rows of requests that arrive close together into one ``predict`` call."""

    def __init__(self, predict, executor, max_batch: int = 64, max_wait_ms: float = 2.0, on_batch=None,
                 inline_ms: float = 0.0, inline_context=contextlib.nullcontext):
        self._predict, self._executor = predict, executor
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000.0
        self._on_batch = on_batch  # called with (rows, seconds predict ran) after each predict call
        self.inline = float(inline_ms) / 1000.0
        self._inline_context = inline_context  # entered around each inline call (app: the Numba thread count)
        self._cost = {}  # size class (rows rounded up to a power of two) -> running mean seconds of a call
        self.inline_calls = self.executor_calls = 0
        self._waiting = 0  # predict() calls awaiting their rows
        self._queue = collections.deque()  # (x, future, arrival time)
        self._rows = 0
        self._expect = self.max_batch  # rows the last batch had: how many a batch waits for
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self):
        """Start the batching task (on the running loop)."""
        if self.max_batch > 1 and self._task is None:
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="fanin-batcher")

    async def stop(self):
        """Stop the task; requests still queued get an error (the server drains before it stops)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            _, fut, _ = self._queue.popleft()
            if not fut.done():
                fut.set_exception(RuntimeError("the server is shutting down"))
        self._rows = 0

    async def predict(self, x: np.ndarray) -> np.ndarray:
        """``predict(x)`` computed in some batch: the rows of the result that belong to ``x``."""
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            if self._task is None:  # batching off
                return await self._call(loop, x)
            fut = loop.create_future()
            self._queue.append((x, fut, loop.time()))
            self._rows += len(x)
            self._arrived.set()
            return await fut
        finally:
            self._waiting -= 1

    async def calibrate(self, x):
        """Run ``predict(x)`` once to measure its size class (in the executor before ``start``; not reported to
        ``on_batch``); call it after a first call of that size has compiled whatever it needs."""
        await self._call(asyncio.get_running_loop(), x, report=False)

    async def _call(self, loop, x, report=True, callers=1):
        size = _size_class(len(x))
        cost = self._cost.get(size)
        if cost is not None and cost <= self.inline and self._task is not None and self._waiting <= callers:
            with self._inline_context():
                y, seconds = self._timed(x)
            self.inline_calls += 1
        else:
            y, seconds = await loop.run_in_executor(self._executor, self._timed, x)
            self.executor_calls += 1
        self._cost[size] = seconds if cost is None else 0.9 * cost + 0.1 * seconds
        if report and self._on_batch is not None:
            self._on_batch(len(x), seconds)
        return y

    def expected_seconds(self, rows: int):
        """The running mean time of a predict call of ``rows`` rows' size class, or None before one ran."""
        return self._cost.get(_size_class(rows))

    def _timed(self, x):
        """(predict(x), the seconds it took), in the predict thread or, inline, on the loop's."""
        t0 = time.perf_counter()
        y = self._predict(x)
        return y, time.perf_counter() - t0

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0][2] + self.max_wait
            while self._rows < self._expect and loop.time() < deadline:
                self._arrived.clear()
                timer = loop.call_at(deadline, self._arrived.set)
                await self._arrived.wait()
                timer.cancel()
            await self._run(loop, self._take())

    def _take(self) -> list:
        """The queued requests of the next batch, oldest first, at most ``max_batch`` rows (at least one request)."""
        batch, rows = [], 0
        while self._queue and (not batch or rows + len(self._queue[0][0]) <= self.max_batch):
            x, fut, _ = self._queue.popleft()
            self._rows -= len(x)
            if not fut.done():  # a caller that went away is skipped
                batch.append((x, fut))
                rows += len(x)
        self._expect = min(self.max_batch, max(1, rows))
        return batch

    async def _run(self, loop, batch):
        if not batch:
            return
        xs = [x for x, _ in batch]
        try:
            y = await self._call(loop, xs[0] if len(xs) == 1 else np.concatenate(xs), callers=len(xs))
        except BaseException as exc:  # every caller of the batch gets the error (or hears of the shutdown)
            stopped = not isinstance(exc, Exception)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(RuntimeError("the server is shutting down") if stopped else exc)
            if stopped:
                raise
            return
        start = 0
        for x, fut in batch:
            if not fut.done():
                fut.set_result(y[start:start + len(x)])
            start += len(x)


def _size_class(rows: int) -> int:
    """Rows rounded up to a power of two: calls of one class are timed together."""
    return 1 << max(0, rows - 1).bit_length()
