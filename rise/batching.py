"""Dynamic batching: concurrent requests for one model merged into one model call.

A request brings its items, a key and `run(items) -> one result per item`. Requests with equal
keys (the caller folds in whatever must match: model version, sampling settings, shapes) join
one batch in arrival order; the batch calls `run` once, in a worker thread so the event loop
never blocks, and each request gets its own slice of the results back.

A batch closes when it holds `max_batch_size` items, or `max_wait_ms` after its first request
arrived; it then waits for a call slot (at most `max_concurrent_batches` model calls at once)
and keeps taking items until it holds one. So a lone request waits at most `max_wait_ms`, and
while the model is busy new requests pile up into the next batch instead of queueing one by one.

Requests that must not share a call (key None, e.g. seeded sampling whose noise depends on the
batch's layout) and requests of `max_batch_size` items or more run alone and are never split:
a request's items always go through one call, as they would unbatched. An exception in `run`
fails every request of that batch with it, and no other request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

from prometheus_client import Histogram
from pydantic import Field

from rise.config import StrictModel

I = TypeVar("I")  # noqa: E741  (one request item)
R = TypeVar("R")  # one item's result

BATCH_ITEMS = Histogram("rise_batch_items", "Items per batched model call", ["batcher"],
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class BatchingConfig(StrictModel):
    # Most items merged into one model call (a larger request runs alone, whole).
    max_batch_size: int = Field(default=8, ge=1)
    # Longest a request waits for others to join its batch; 0 = only while the model is busy.
    max_wait_ms: float = Field(default=2.0, ge=0)
    # Model calls running at once; more batches wait (and keep filling) for a slot.
    max_concurrent_batches: int = Field(default=1, ge=1)


@dataclass
class Batched(Generic[R]):
    results: list[R]  # this request's results, in its item order
    queue_ms: float  # from submit to the start of the model call
    compute_ms: float  # the model call (shared by the whole batch)
    batch_items: int  # items in that call, this request's included


@dataclass
class _Batch:
    run: Callable[[list], Sequence]
    items: list = field(default_factory=list)
    waiters: list[tuple[int, int, asyncio.Future, float]] = field(default_factory=list)  # start, stop, future, enqueued
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set: no more items join


class Batcher:
    def __init__(self, config: BatchingConfig, name: str = "model"):
        self.config = config
        self.name = name
        self.calls = 0  # model calls made, and items they held: calls < requests means merging happened
        self.items = 0
        self._open: dict[Hashable, _Batch] = {}  # key -> the batch still taking items
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._tasks: set[asyncio.Task] = set()  # flushers, referenced until done

    async def submit(self, key: Hashable | None, items: list[I], run: Callable[[list[I]], Sequence[R]]) -> Batched[R]:
        """Run `items` through `run`, merged with other requests of the same key."""
        enqueued = time.perf_counter()
        alone = key is None or len(items) >= self.config.max_batch_size
        batch = None if alone else self._open.get(key)
        if batch is not None and len(batch.items) + len(items) > self.config.max_batch_size:
            self._close(key, batch)  # full for us: it goes as it is, we start the next one
            batch = None
        if batch is None:
            batch = _Batch(run)
            if not alone:
                self._open[key] = batch
            task = asyncio.create_task(self._flush(key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        future = asyncio.get_running_loop().create_future()
        batch.waiters.append((len(batch.items), len(batch.items) + len(items), future, enqueued))
        batch.items.extend(items)
        if alone or len(batch.items) >= self.config.max_batch_size:
            self._close(key, batch)
        return await future

    def _close(self, key: Hashable | None, batch: _Batch) -> None:
        batch.closed.set()
        if self._open.get(key) is batch:
            del self._open[key]

    async def _flush(self, key: Hashable | None, batch: _Batch) -> None:
        try:
            await asyncio.wait_for(batch.closed.wait(), self.config.max_wait_ms / 1000)
        except TimeoutError:
            pass
        async with self._slots:
            self._close(key, batch)
            started = time.perf_counter()
            self.calls += 1
            self.items += len(batch.items)
            BATCH_ITEMS.labels(self.name).observe(len(batch.items))
            try:
                results = await asyncio.to_thread(batch.run, batch.items)
                if len(results) != len(batch.items):
                    raise RuntimeError(f"{self.name}: the model returned {len(results)} results for {len(batch.items)} items")
            except Exception as exc:  # noqa: BLE001  (handed to every request of the batch)
                for _, _, future, _ in batch.waiters:
                    if not future.done():  # a cancelled caller has gone
                        future.set_exception(exc)
                return
            compute_ms = (time.perf_counter() - started) * 1000
        for start, stop, future, enqueued in batch.waiters:
            if not future.done():
                future.set_result(Batched(list(results[start:stop]), (started - enqueued) * 1000, compute_ms, len(batch.items)))

