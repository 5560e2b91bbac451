"""The V2 hot path in process (fast tier): what the parser works out once per model follows
the model being served; small micro-batches are scored on the event loop, large ones on the
batcher's own thread, and a model slow on a small batch holds the loop up once; requests that
come back together but reach the batcher one by one (gRPC calls, a burst's straggler) share a
batch; a batch mixing JSON lists and binary arrays scores each as alone."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import microbatch
from service.bundle import read_bundle
from service.errors import BadRequest
from service.microbatch import INLINE_RECORDS, INLINE_SECONDS, SLOW_STRIKES, MicroBatcher
from service.scoring import Scorer
from service.settings import Settings
from service.v2_request import parse as _parse
from tests.conftest import records
from training.demo_data import generate_payments


def _request(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """A V2 JSON request with one tensor per name (FP64 numbers, BOOL, BYTES)."""
    inputs = []
    for name in names:
        data = [r[name] for r in rows]
        dt = (
            "BOOL" if isinstance(data[0], bool) else "BYTES" if isinstance(data[0], str) else "FP64"
        )
        inputs.append({"name": name, "shape": [len(data)], "datatype": dt, "data": data})
    return {"inputs": inputs}


def test_the_parser_follows_the_model_being_served(bundle_dir: Path) -> None:
    first = read_bundle(bundle_dir).manifest
    # the next model has one field fewer (same name, another version): a request with that
    # field is refused by it, and still accepted by the first
    dropped = first.features[-1]
    second = first.model_copy(update={"version": "next", "features": first.features[:-1]})
    settings = Settings(bundle=bundle_dir, unknown_fields="reject")
    rows = records(generate_payments(3, seed=11).fillna({"device": "mobile"}))
    body = _request(rows, [f.name for f in first.features])
    for m, ok in ((first, True), (second, False), (first, True), (second, False)):
        if ok:
            columns, n, *_ = _parse(body, m, settings)
            assert n == 3 and set(columns) == {f.name for f in first.features}
        else:
            with pytest.raises(BadRequest, match=f"unknown input.*{dropped.name}"):
                _parse(body, m, settings)
    # ignored, the field is left out of the second model's columns
    columns, n, *_ = _parse(body, second, Settings(bundle=bundle_dir, unknown_fields="ignore"))
    assert n == 3 and dropped.name not in columns


def test_small_batches_are_scored_on_the_loop_and_large_ones_and_grpcs_on_the_thread(
    bundle_dir: Path,
) -> None:
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    threads: list[tuple[str, int]] = []
    score_many = scorer.score_many

    def recording(requests: Any) -> Any:
        rows = sum(len(next(iter(c.values()))) for c, _ in requests)
        threads.append((threading.current_thread().name, rows))
        return score_many(requests)

    scorer.score_many = recording  # type: ignore[method-assign]
    rows = records(generate_payments(12, seed=5))
    single = [{f.name: [r.get(f.name)] for f in scorer.manifest.features} for r in rows]
    big = records(generate_payments(INLINE_RECORDS + 1, seed=6))
    bulk = {f.name: [r.get(f.name) for r in big] for f in scorer.manifest.features}

    async def run() -> tuple[list[float], str]:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.score(scorer, c, 1, None) for c in single))
            await batcher.score(scorer, bulk, len(big), None)
            # gRPC's calls (on_loop=False) go to the thread, however small their batch
            await asyncio.gather(*(batcher.score(scorer, c, 1, None, False) for c in single))
        finally:
            await batcher.stop()
        with pytest.raises(RuntimeError):  # stopped: its thread is released
            batcher.executor.submit(print)
        return [float(r.score[0]) for r in results], threading.current_thread().name

    scores, loop_thread = asyncio.run(run())
    assert (loop_thread, 12) in threads  # the 12 requests in one batch, on the event loop
    assert [t for t, n in threads if n > INLINE_RECORDS] == ["microbatch_0"]
    assert threads[-1] == ("microbatch_0", 12)
    alone = [float(Scorer.score(scorer, c, None).score[0]) for c in single]
    assert scores == pytest.approx(alone, rel=1e-6)  # each caller gets its own record's score


def test_a_batch_of_json_and_binary_requests_scores_each_as_alone(bundle_dir: Path) -> None:
    """Binary tensors arrive as arrays, JSON ones as lists (None: missing): one batch of both
    gives each request what it gets alone."""
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    rows = records(generate_payments(6, seed=7))
    feats = scorer.manifest.features
    as_lists = [{f.name: [r.get(f.name)] for f in feats} for r in rows]
    as_arrays = [
        {
            f.name: [r.get(f.name)]
            if f.kind == "categorical" or r.get(f.name) is None
            else np.array([r[f.name]], np.bool_ if f.kind == "boolean" else np.float64)
            for f in feats
        }
        for r in rows
    ]
    mixed = [c for pair in zip(as_lists, as_arrays, strict=True) for c in pair]
    batch = scorer.score_many([(c, None) for c in mixed])
    for columns, result in zip(mixed, batch.results, strict=True):
        alone = scorer.score(columns, None)
        assert result.score == pytest.approx(alone.score, rel=1e-6)
        assert result.is_anomaly.tolist() == alone.is_anomaly.tolist()
    assert batch.results[0].score == pytest.approx(batch.results[1].score, rel=1e-6)


def _slowed(scorer: Scorer, slow_calls: set[int]) -> list[str]:
    """The thread of each of ``scorer``'s calls from now on; the calls numbered in
    ``slow_calls`` (from 0) burn 2 * INLINE_SECONDS of CPU first, as a slow graph would."""
    threads: list[str] = []
    score_many = scorer.score_many

    def slowed(requests: Any) -> Any:
        if len(threads) in slow_calls:
            end = time.thread_time() + 2 * INLINE_SECONDS
            while time.thread_time() < end:
                pass
        threads.append(threading.current_thread().name)
        return score_many(requests)

    scorer.score_many = slowed  # type: ignore[method-assign]
    return threads


def _pairs(scorer: Scorer, batches: int) -> str:
    """Score ``batches`` batches of two requests (a lone one goes to the thread); the name
    of the event loop's thread."""
    rec = records(generate_payments(1, seed=8))[0]
    columns = {f.name: [rec.get(f.name)] for f in scorer.manifest.features}

    async def run() -> str:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            for _ in range(batches):
                await asyncio.gather(*(batcher.score(scorer, columns, 1, None) for _ in "ab"))
        finally:
            await batcher.stop()
        return threading.current_thread().name

    return asyncio.run(run())


def test_a_model_slow_on_small_batches_holds_the_loop_up_a_few_times(bundle_dir: Path) -> None:
    """A model that takes more CPU than INLINE_SECONDS on SLOW_STRIKES small batches in a row:
    its later batches are scored on the batcher's thread."""
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    threads = _slowed(scorer, set(range(100)))
    loop = _pairs(scorer, SLOW_STRIKES + 2)
    assert threads == [loop] * SLOW_STRIKES + ["microbatch_0"] * 2


def test_one_slow_batch_does_not_send_a_quick_model_to_the_thread(bundle_dir: Path) -> None:
    """onnxruntime's first run at a new batch size can be slow on a busy machine: one slow batch
    between quick ones leaves the model's small batches on the loop."""
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    threads = _slowed(scorer, {0, 2})
    loop = _pairs(scorer, 5)
    assert threads == [loop] * 5


def _batch_sizes(scorer: Scorer) -> list[int]:
    """The requests in each of ``scorer``'s batches, from now on."""
    sizes: list[int] = []
    score_many = scorer.score_many

    def counting(requests: Any) -> Any:
        sizes.append(len(requests))
        return score_many(requests)

    scorer.score_many = counting  # type: ignore[method-assign]
    return sizes


def test_requests_coming_back_one_by_one_share_a_batch(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC calls reach the batcher one per round trip of grpcio's completion queue: the 6
    calls of clients with one call in flight each come back a few loop turns apart, and are
    still scored together, in one batch, as the 6 before them were; fewer than that are
    scored once FILL_SECONDS is up."""
    monkeypatch.setattr(microbatch, "FILL_SECONDS", 5.0)  # the test never waits it out ...
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    sizes = _batch_sizes(scorer)
    rows = records(generate_payments(6, seed=9))
    calls = [{f.name: [r.get(f.name)] for f in scorer.manifest.features} for r in rows]

    async def one_by_one(batcher: MicroBatcher) -> list[Any]:
        waiting = []
        for c in calls:
            waiting.append(asyncio.ensure_future(batcher.score(scorer, c, 1, None, False)))
            for _ in range(5):  # the loop turns between two calls' arrivals
                await asyncio.sleep(0)
        return list(await asyncio.gather(*waiting))

    async def run() -> tuple[float, float]:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.score(scorer, c, 1, None, False) for c in calls))
            start = time.perf_counter()
            for _ in range(3):
                await one_by_one(batcher)
            waves = time.perf_counter() - start
            monkeypatch.setattr(microbatch, "FILL_SECONDS", 0.05)  # ... but here
            start = time.perf_counter()
            await batcher.score(scorer, calls[0], 1, None, False)  # alone, after bursts
            return waves, time.perf_counter() - start
        finally:
            await batcher.stop()

    waves, lone = asyncio.run(run())
    assert sizes == [6, 6, 6, 6, 1]
    assert waves < 5  # the sixth call of each wave ended the wait
    assert 0.05 <= lone < 5


def test_a_burst_with_a_straggler_is_one_batch_on_the_loop(bundle_dir: Path) -> None:
    """REST requests from clients with one in flight each: when one of a burst comes a few loop
    turns after the others, the burst is still one batch, scored on the loop, not the others
    first and the straggler alone on the thread after them (the tail at c=8)."""
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    threads: list[tuple[str, int]] = []
    score_many = scorer.score_many

    def recording(requests: Any) -> Any:
        threads.append((threading.current_thread().name, len(requests)))
        return score_many(requests)

    rows = records(generate_payments(8, seed=10))
    calls = [{f.name: [r.get(f.name)] for f in scorer.manifest.features} for r in rows]
    for _ in range(3):  # a first call at a new batch size can take over INLINE_SECONDS
        score_many([(c, None) for c in calls])
    scorer.score_many = recording  # type: ignore[method-assign]

    async def straggler(batcher: MicroBatcher) -> Any:
        for _ in range(3):
            await asyncio.sleep(0)
        return await batcher.score(scorer, calls[-1], 1, None)

    async def run() -> str:
        batcher = MicroBatcher(256, 0)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.score(scorer, c, 1, None) for c in calls))
            await asyncio.gather(
                *(batcher.score(scorer, c, 1, None) for c in calls[:-1]), straggler(batcher)
            )
        finally:
            await batcher.stop()
        return threading.current_thread().name

    loop_thread = asyncio.run(run())
    assert threads == [(loop_thread, 8), (loop_thread, 8)]
