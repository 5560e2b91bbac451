"""Adaptive micro-batching: concurrent requests share one onnxruntime call.

Each worker runs one batch at a time. While a batch runs, new requests queue up; the next batch
takes all of them (up to ``max_batch`` records), so under load calls grow by themselves and a
lone request goes straight through. ``max_wait`` (seconds) adds a short wait for more requests,
but only while requests are arriving concurrently (the previous batch held more than one).
Validation happens before a request joins the queue, so a bad record fails only its own
request; results go back to each caller in its own order. Small batches of several requests
are scored on the event loop itself, lone requests and larger batches on the batcher's own
thread (see ``INLINE_RECORDS``).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service import metrics
from service.scoring import Scored, Scorer

# batches of several requests and at most this many records are scored on the event loop: a
# hop to the scoring thread and back costs more than such a batch, and while it is scored the
# loop has nothing else to do (requests came back-to-back: every pending one is in the batch);
# a lone request goes to the thread, so that requests arriving meanwhile can share the next
# call, and so do larger batches (bulk requests, at most max_batch records)
INLINE_RECORDS = 64
# ... as long as the model scores them quickly (~1 ms of CPU for 64 records here): a model
# slower than this on a small batch has every later batch scored on the thread, so that a slow
# model holds the event loop up once at most
INLINE_SECONDS = 0.005


@dataclass
class _Item:
    scorer: Scorer
    columns: Mapping[str, Sequence[Any]]
    n: int
    score_type: str | None
    future: asyncio.Future[Scored]
    on_loop: bool  # may be scored on the event loop (see ``score``)


class MicroBatcher:
    def __init__(self, max_batch: int, max_wait: float) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.pending: deque[_Item] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last_batch_requests = 0
        # one thread of its own, handed batches with the event loop's executor hook: a hop
        # through anyio's worker pool (run_in_threadpool) costs about twice the CPU, and when
        # batches are small (gRPC calls come a few at a time) that was most of a request
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="microbatch")
        self.slow: weakref.WeakSet[Scorer] = weakref.WeakSet()  # models never scored inline

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False)

    async def score(
        self,
        scorer: Scorer,
        columns: Mapping[str, Sequence[Any]],
        n: int,
        score_type: str | None,
        on_loop: bool = True,
    ) -> Scored:
        """The request's results, once its batch is scored. ``on_loop=False``: its batch goes to
        the thread whatever its size; gRPC calls reach the loop one per round trip of grpcio's
        completion queue, so scoring them on the loop keeps their batches at one call each (at
        c=64 1,800 calls/s on the loop against 3,000 on the thread, idle machine)."""
        fut: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(scorer, columns, n, score_type, fut, on_loop))
        self.wake.set()
        return await fut

    def _take(self) -> list[_Item]:
        """The next batch: queued requests for one model, up to max_batch records (at least
        one request, however large)."""
        first = self.pending.popleft()
        batch, size = [first], first.n
        rest: deque[_Item] = deque()
        while self.pending:
            item = self.pending.popleft()
            if item.scorer is first.scorer and size + item.n <= self.max_batch:
                batch.append(item)
                size += item.n
            else:
                rest.append(item)
        rest.extend(self.pending)
        self.pending = rest
        return batch

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
            if self.max_wait > 0 and self.last_batch_requests > 1:
                await asyncio.sleep(self.max_wait)
            batch = [i for i in self._take() if not i.future.cancelled()]
            self.last_batch_requests = len(batch)
            if not batch:
                continue
            try:
                results = await self._scored(batch)
            except Exception as e:  # e.g. onnxruntime failed: every caller in the batch hears it
                for i in batch:
                    if not i.future.done():
                        i.future.set_exception(e)
                continue
            for i, r in zip(batch, results, strict=True):
                if not i.future.done():
                    i.future.set_result(r)

    async def _scored(self, batch: list[_Item]) -> list[Scored]:
        """Score a batch on the event loop (small, of a model that has been quick) or on the
        batcher's thread."""
        scorer, requests = batch[0].scorer, [(i.columns, i.score_type) for i in batch]
        on_loop = len(batch) > 1 and all(i.on_loop for i in batch) and scorer not in self.slow
        if not on_loop or sum(i.n for i in batch) > INLINE_RECORDS:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, metrics.scored, scorer, requests)
        start = time.thread_time()  # CPU time: a busy machine's preemptions do not count
        try:
            return metrics.scored(scorer, requests)
        finally:
            if time.thread_time() - start > INLINE_SECONDS:
                self.slow.add(scorer)
