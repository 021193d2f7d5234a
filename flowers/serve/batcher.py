"""Dynamic batching: concurrent requests merged into one model call, and a bound on held requests.

MicroBatcher: a request's images wait in a queue; one asyncio task takes the oldest request, adds
the next ones while the batch stays within max_batch images and the oldest has waited less than
max_wait_ms, then runs the model once in a dedicated thread (one model instance, one call at a time)
while new requests queue up for the next batch. It waits only while a request is being decoded
(and so about to join): a lone request runs at once instead of paying max_wait_ms for nothing.
A request is never split across batches (a request larger than max_batch is a batch of its own;
the model runs it in max_batch chunks).

Admission: the most requests the server holds at once (being decoded, queued or in the model).
One more is refused at once -- HTTP 503 with Retry-After -- instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class Overloaded(Exception):
    """The server holds as many requests as it may; the client should retry later."""


class Admission:
    """A count of held requests with a limit; asyncio code only (no locking needed)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.held = 0
        self._on_change = on_change or (lambda held: None)

    def __enter__(self) -> Admission:
        if self.held >= self.limit:
            raise Overloaded(f"the server holds {self.held} requests, its limit (--max-queue); "
                             "retry shortly")
        self.held += 1
        self._on_change(self.held)
        return self

    def __exit__(self, *exc_info) -> None:
        self.held -= 1
        self._on_change(self.held)


@dataclass
class _Queued:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Merges concurrent predict() calls into batches for `run` (images -> probabilities).

    Args:
        run: the model call, uint8 images [N, S, S, 3] -> [N, C]; called from one thread.
        max_batch: most images per model call (a single larger request still runs alone).
        max_wait_ms: longest the oldest queued request waits for others to join its batch.
        on_batch: called with (images in the batch, seconds the model call took).
        on_queue: called with the number of queued requests whenever it changes.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None):
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_queue = on_queue or (lambda depth: None)
        self._queue: collections.deque[_Queued] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flowers-model")
        self._task: asyncio.Task | None = None
        self._expected = 0  # requests being decoded, which will call predict() or give up


    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="flowers-batcher")

    async def stop(self) -> None:
        """Stop after the batch in progress; requests still queued get an error (none after a
        graceful shutdown, which waits for every open request first)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server stopped before this request ran"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce a request being decoded; call predict() right after the block (no await between)."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            self._arrived.set()  # a request that failed to decode is no longer worth waiting for

    async def call_in_model_thread(self, fn: Callable[[], object]) -> object:
        """Run fn in the model's thread (the model's load and warm-up, before start())."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for one request's images, computed in a batch with other requests."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(images, future))
        self._on_queue(len(self._queue))
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather(self._queue[0].queued_at + self.max_wait_s)
            batch = self._take()
            self._on_queue(len(self._queue))
            images = np.concatenate([item.images for item in batch])
            start = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(self._executor, self._run, images)
            except Exception as exc:  # a runtime failure answers this batch's requests with it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._on_batch(len(images), time.perf_counter() - start)
            first = 0
            for item in batch:
                if not item.future.done():  # a client that gave up has a cancelled future
                    item.future.set_result(probabilities[first:first + len(item.images)])
                first += len(item.images)

    async def _gather(self, deadline: float) -> None:
        """Wait until the queue holds a full batch, no request is about to join, or the oldest
        request's wait is over."""
        while self._expected and self._queued_images() < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _queued_images(self) -> int:
        return sum(len(item.images) for item in self._queue)

    def _take(self) -> list[_Queued]:
        batch = [self._queue.popleft()]
        size = len(batch[0].images)
        while self._queue and size + len(self._queue[0].images) <= self.max_batch:
            size += len(self._queue[0].images)
            batch.append(self._queue.popleft())
        return batch
