"""Big request bodies are parsed and validated in a helper process, not in the worker.

Parsing JSON holds the GIL for the whole call, in any thread: 16 MB of hostile JSON (a million
distinct keys, millions of empty arrays) takes 0.3 to 1.5 s, and in the worker that stops the
event loop (health checks, every other request) as long. The helper process parses a big body,
validates it and sends back only what scoring needs (the columns) or the error, its list
capped. Small bodies (the hot path) stay on the event loop. The helper is replaced every
:data:`TASKS_PER_CHILD` bodies, so what a hostile body made it grow goes back to the system.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from service import metrics
from service.errors import ServiceError, Timeout

T = TypeVar("T")
TASKS_PER_CHILD = 16


class _Tally:
    """Stands in for ``metrics.INVALID_RECORDS`` in the helper: the counts go back with the
    result and are counted in the worker (the helper's own metrics are never scraped)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def labels(self, reason: str) -> _Tally.Inc:
        return _Tally.Inc(self.counts, reason)

    class Inc:
        def __init__(self, counts: Counter[str], reason: str) -> None:
            self.counts, self.reason = counts, reason

        def inc(self, n: int = 1) -> None:
            self.counts[self.reason] += n


def _run(fn: Callable[..., T], *args: Any) -> tuple[T | None, ServiceError | None, dict[str, int]]:
    """In the helper: (result, None, counts) or (None, the service error, counts)."""
    tally = _Tally()
    metrics.INVALID_RECORDS = tally  # type: ignore[assignment]
    try:
        return fn(*args), None, dict(tally.counts)
    except ServiceError as e:
        e.forget()
        return None, e, dict(tally.counts)


class ParserProcess:
    """One helper process per worker, started with the app (a fork of a small server process
    that has the service's modules loaded, so that replacing it takes milliseconds)."""

    def __init__(self) -> None:
        self.pool = self._new_pool()

    @staticmethod
    def _new_pool() -> ProcessPoolExecutor:
        # The fork server runs `python -c ...`, which puts the working directory first on its
        # sys.path (and Python 3.11 ignores the parent's): a `service` directory there would be
        # imported instead of this one. Safe-path mode leaves the working directory out.
        os.environ["PYTHONSAFEPATH"] = "1"
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["service.native", "service.v2"])
        return ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=TASKS_PER_CHILD)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the helper; its ServiceError is raised here."""
        loop = asyncio.get_running_loop()
        try:
            result, error, counts = await loop.run_in_executor(self.pool, _run, fn, *args)
        except BrokenProcessPool:  # the helper died (killed, out of memory): a new one
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            raise Timeout("the request could not be parsed (the parser stopped); retry") from None
        for reason, n in counts.items():
            metrics.INVALID_RECORDS.labels(reason).inc(n)
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    async def warm_up(self) -> None:
        await self.run(int)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
