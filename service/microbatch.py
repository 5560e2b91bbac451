"""Adaptive micro-batching: concurrent requests share one onnxruntime call.

Each worker runs one batch at a time. While a batch runs, new requests queue up; the next batch
takes all of them (up to ``max_batch`` records), so under load calls grow by themselves and a
lone request goes straight through. Requests that come back together (clients with one request
in flight each) reach the batcher one by one, a gRPC call per round trip of grpcio's completion
queue, so the next batch first waits, at most ``FILL_SECONDS``, until as many requests are
pending as the largest of the last few batches held: a burst is scored as one batch, and a
lone request (the last batches were lone too) never waits. ``max_wait`` (seconds) adds a
further wait, while requests are arriving concurrently (the previous batch held more than one).
Validation happens before a request joins the queue, so a bad record fails only its own
request; results go back to each caller in its own order. Small batches of several requests
are scored on the event loop itself, and so are lone requests that come one at a time (the
last batches were lone too); other lone requests, gRPC calls and larger batches on the
batcher's own thread (see ``INLINE_RECORDS``).
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
# slower than this on SLOW_STRIKES small batches in a row has every later batch scored on the
# thread, so that a slow model holds the event loop up a few times at most (one slow batch is
# not enough: onnxruntime's first run at a new batch size can take over 5 ms on a busy machine,
# and one such run used to send a quick model to the thread for good)
INLINE_SECONDS = 0.005
SLOW_STRIKES = 3
# the next batch waits, at most this long, until as many requests are pending as the largest of
# the last RECENT batches held (see the module's docstring): with 64 gRPC calls in flight,
# batches held 3-7 calls without it and 10-19 with it, and the server's CPU per call fell from
# ~450 to ~240 us; REST's bursts at 8 in flight go as one batch on the loop (p99 2.4 -> 1.6 ms).
# A longer cap gained nothing; a burst that is complete ends the wait at once
FILL_SECONDS = 0.002
RECENT = 8


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
        self.recent: deque[int] = deque([1], maxlen=RECENT)  # requests in the last batches
        self.filled = asyncio.Event()  # set by score() once ``want`` requests are pending
        self.want = 0  # 0: _fill is not waiting
        # one thread of its own, handed batches with the event loop's executor hook: a hop
        # through anyio's worker pool (run_in_threadpool) costs about twice the CPU, and when
        # batches are small (gRPC calls come a few at a time) that was most of a request
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="microbatch")
        # slow inline batches in a row per model (SLOW_STRIKES of them: never inline again)
        self.strikes: weakref.WeakKeyDictionary[Scorer, int] = weakref.WeakKeyDictionary()

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
        """The request's results, once its batch is scored. ``on_loop=False`` (gRPC calls): its
        batch goes to the thread whatever its size. What limits gRPC is grpcio's work for each
        call on the loop, and onnxruntime lets go of the GIL while it runs, so on the thread a
        batch is scored while the loop carries on with the other calls (64 in flight: 4,000-4,400
        calls/s against 3,400 with their batches on the loop; p99 at 8 in flight 2.4-3.1 ms
        against 5.1-6.7)."""
        fut: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(scorer, columns, n, score_type, fut, on_loop))
        self.wake.set()
        if self.want and len(self.pending) >= self.want:
            self.filled.set()
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
            await self._fill()
            if self.max_wait > 0 and self.recent[-1] > 1:
                await asyncio.sleep(self.max_wait)
            batch = [i for i in self._take() if not i.future.cancelled()]
            self.recent.append(len(batch))
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

    async def _fill(self) -> None:
        """Wait, at most FILL_SECONDS, until as many requests are pending as the largest of the
        last batches held."""
        want = max(self.recent)
        if len(self.pending) >= want:
            return
        self.want = want
        self.filled.clear()
        try:
            async with asyncio.timeout(FILL_SECONDS):
                await self.filled.wait()
        except TimeoutError:
            pass  # fewer came: the next batches' sizes say so
        finally:
            self.want = 0

    async def _scored(self, batch: list[_Item]) -> list[Scored]:
        """Score a batch on the event loop (small, of a model that has been quick) or on the
        batcher's thread."""
        scorer, requests = batch[0].scorer, [(i.columns, i.score_type) for i in batch]
        quick = self.strikes.get(scorer, 0) < SLOW_STRIKES
        # a lone request goes to the thread so that requests arriving meanwhile can share the
        # next call; after RECENT lone batches in a row none arrive (one request in flight at a
        # time), and the hop was most of the difference between such a request and one scored
        # here (REST at c=1: ~200 us of the server's CPU; gRPC measured no better on the loop)
        one_at_a_time = max(self.recent) == 1  # this batch and the RECENT - 1 before it lone
        on_loop = (len(batch) > 1 or one_at_a_time) and all(i.on_loop for i in batch) and quick
        if not on_loop or sum(i.n for i in batch) > INLINE_RECORDS:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, metrics.scored, scorer, requests)
        start = time.thread_time()  # CPU time: a busy machine's preemptions do not count
        try:
            return metrics.scored(scorer, requests)
        finally:
            slow = time.thread_time() - start > INLINE_SECONDS
            self.strikes[scorer] = self.strikes.get(scorer, 0) + 1 if slow else 0
