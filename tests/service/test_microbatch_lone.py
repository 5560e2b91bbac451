"""Where the micro-batcher scores a lone request (fast tier): on the event loop when requests
come one at a time (the last RECENT batches were lone: nothing would arrive to share the
thread's call, and the hop to the thread and back was most of such a request's cost), on the
batcher's thread when requests have lately come together (so that those arriving meanwhile
can share the next call), and gRPC calls always on the thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from service.microbatch import RECENT, MicroBatcher
from service.scoring import Scorer
from tests.conftest import records
from training.demo_data import generate_payments


def _threads(scorer: Scorer) -> list[tuple[str, int]]:
    """(thread, requests) of each of ``scorer``'s batches from now on."""
    seen: list[tuple[str, int]] = []
    score_many = scorer.score_many

    def recording(requests: Any) -> Any:
        seen.append((threading.current_thread().name, len(requests)))
        return score_many(requests)

    scorer.score_many = recording  # type: ignore[method-assign]
    return seen


def test_requests_one_at_a_time_are_scored_on_the_loop_until_some_come_together(
    bundle_dir: Path,
) -> None:
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    rows = records(generate_payments(4, seed=21))
    calls = [{f.name: [r.get(f.name)] for f in scorer.manifest.features} for r in rows]
    seen = _threads(scorer)

    async def run() -> tuple[str, list[float]]:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            scores = [float((await batcher.score(scorer, c, 1, None)).score[0]) for c in calls]
            await asyncio.gather(*(batcher.score(scorer, c, 1, None) for c in calls))  # together
            for _ in range(RECENT):  # one at a time again: the first RECENT - 1 on the thread
                await batcher.score(scorer, calls[0], 1, None)
        finally:
            await batcher.stop()
        return threading.current_thread().name, scores

    loop, scores = asyncio.run(run())
    thread = "microbatch_0"
    assert seen == [(loop, 1)] * 4 + [(loop, 4)] + [(thread, 1)] * (RECENT - 1) + [(loop, 1)]
    alone = [float(Scorer.score(scorer, c, None).score[0]) for c in calls]
    assert scores == alone  # the same onnxruntime call, wherever it runs


def test_grpc_calls_one_at_a_time_stay_on_the_thread(bundle_dir: Path) -> None:
    """gRPC calls (``on_loop=False``) go to the thread even one at a time: on the loop they
    measured no cheaper, and grpcio's work for other calls goes on while the thread scores."""
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    rec = records(generate_payments(1, seed=22))[0]
    columns = {f.name: [rec.get(f.name)] for f in scorer.manifest.features}
    seen = _threads(scorer)

    async def run() -> None:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            for _ in range(3):
                await batcher.score(scorer, columns, 1, None, False)
        finally:
            await batcher.stop()

    asyncio.run(run())
    assert seen == [("microbatch_0", 1)] * 3
