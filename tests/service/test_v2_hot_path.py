"""The V2 hot path in process (fast tier): what the parser works out once per model follows
the model being served, and micro-batches are scored on the batcher's own thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from service.bundle import read_bundle
from service.errors import BadRequest
from service.microbatch import MicroBatcher
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


def test_micro_batches_run_on_the_batchers_own_thread(bundle_dir: Path) -> None:
    scorer = Scorer(bundle_dir)
    scorer.warm_up()
    threads: set[str] = set()
    score_many = scorer.score_many

    def recording(*args: Any, **kw: Any) -> Any:
        threads.add(threading.current_thread().name)
        return score_many(*args, **kw)

    scorer.score_many = recording  # type: ignore[method-assign]
    rows = records(generate_payments(12, seed=5))
    columns = [{f.name: [r.get(f.name)] for f in scorer.manifest.features} for r in rows]

    async def run() -> list[float]:
        batcher = MicroBatcher(64, 0)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.score(scorer, c, 1, None) for c in columns))
        finally:
            await batcher.stop()
        with pytest.raises(RuntimeError):  # stopped: its thread is released
            batcher.executor.submit(print)
        return [float(r.score[0]) for r in results]

    scores = asyncio.run(run())
    assert threads and all(t.startswith("microbatch") for t in threads)
    alone = [float(Scorer.score(scorer, c, None).score[0]) for c in columns]
    assert scores == pytest.approx(alone, rel=1e-6)  # each caller gets its own record's score
