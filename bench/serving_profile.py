"""Where a scoring request's time goes, and which onnxruntime thread setting serves it best.

    python bench/serving_profile.py [--bundle DIR]   (default: the demo model, trained if absent)

Prints medians over repeats, measured in this one run:
1. onnxruntime call time by batch size with 1 and 2 intra-op threads;
2. the steps of a native /v1/score request of 1, 64 and 1,000 records, in process (no HTTP):
   validation, encoding + inference, building the result objects, JSON encoding (orjson vs the
   standard library);
3. CPU time per single-record request through the whole ASGI app, in process (no sockets),
   64 at a time: the service (micro-batching on) against a FastAPI endpoint that returns a
   constant. What is left between them is the per-request cost that HTTP load tests see;
4. the same for one record through V2 infer, as JSON and as binary tensors (tritonclient's
   defaults: FP32/INT64/BOOL/BYTES inputs, binary outputs), against the native path;
5. the same native request with and without the latent files (the cost of top features that
   carry the record's value and what the model expected).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from naive_service import trivial_app  # type: ignore[import-not-found]  # beside this script

from service.app import create_app
from service.features import encode_columns
from service.native import results_json
from service.records import records_to_columns
from service.runtime import OnnxModel
from service.scoring import Scorer
from service.settings import Settings
from training.demo_data import generate_payments


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path)
    a = p.parse_args()
    if a.bundle is None:
        from training.cli import demo_bundle

        a.bundle = demo_bundle(progress=False)
    scorer = Scorer(a.bundle)
    df = generate_payments(4096, seed=123)
    recs = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]
    print(
        f"model: {scorer.manifest.name} {scorer.version}, {len(scorer.manifest.features)} features"
    )
    onnx_call_times(scorer, df)
    request_steps(scorer, recs, a.bundle)
    body = orjson.dumps({"records": recs[:1]})
    asgi_cost(a.bundle, body)
    v2_cost(scorer, recs[0], a.bundle, body)
    explanation_cost(a.bundle, body)
    return 0


def onnx_call_times(scorer: Scorer, df: pd.DataFrame) -> None:
    """1. onnxruntime call time by batch size, 1 and 2 intra-op threads."""
    feats = scorer.manifest.features
    print("\n1. onnxruntime call, median ms (rows/s)")
    print(f"{'batch':>6} | {'1 thread':>22} | {'2 threads':>22}")
    sessions = {t: OnnxModel(scorer.bundle.model_path, intra_op_threads=t) for t in (1, 2)}
    for n in (1, 64, 1000, 4096):
        inputs = encode_columns(feats, {f.name: df[f.name].to_numpy()[:n] for f in feats}).inputs
        cells = []
        for sess in sessions.values():
            ms = median_ms(lambda s=sess, i=inputs: s.run(i), 200 if n <= 64 else 30)
            cells.append(f"{ms:8.3f} ({n / ms * 1000:9.0f}/s)")
        print(f"{n:>6} | {cells[0]:>22} | {cells[1]:>22}")


def request_steps(scorer: Scorer, recs: list[dict[str, Any]], bundle: Path) -> None:
    """2. The steps of a native /v1/score request in process: validate, score, build the
    results, JSON-encode them (orjson and the standard library)."""
    print("\n2. native request steps in process, median ms")
    settings = Settings(bundle=bundle)
    print(
        f"{'records':>7} | {'validate':>8} | {'score':>8} | {'results':>8} | "
        f"{'orjson':>8} | {'json':>8}"
    )
    for n in (1, 64, 1000):
        body = {"records": [{**r} for r in recs[:n]]}
        parsed = records_to_columns(body, scorer.records, settings)
        cols = parsed.columns
        scored = scorer.score(cols, None)
        res = results_json(scorer, parsed, scored, 3)
        rep = 300 if n <= 64 else 30
        v = median_ms(lambda b=body: records_to_columns(b, scorer.records, settings), rep)
        s = median_ms(lambda c=cols: scorer.score(c, None), rep)
        r = median_ms(lambda sc=scored, p=parsed: results_json(scorer, p, sc, 3), rep)
        oj = median_ms(lambda x=res: orjson.dumps(x), rep)
        js = median_ms(lambda x=res: json.dumps(x), rep)
        print(f"{n:>7} | {v:8.3f} | {s:8.3f} | {r:8.3f} | {oj:8.3f} | {js:8.3f}")


def asgi_cost(bundle: Path, body: bytes) -> None:
    """3. CPU per single-record request through the ASGI app: the service against a trivial
    FastAPI endpoint."""
    print("\n3. CPU per single-record request through the ASGI app, 64 concurrent (median of 5)")
    for name, make in (
        ("service", lambda: create_app(Settings(bundle=bundle, log_level="warning"))),
        ("trivial FastAPI endpoint", trivial_app),
    ):
        us = asyncio.run(asgi_cpu_per_request(make(), body, 64, 4000, 5))
        print(f"   {name}: {us:.0f} us")


def v2_cost(scorer: Scorer, rec: dict[str, Any], bundle: Path, body: bytes) -> None:
    """4. The same for one record through V2 infer (JSON, binary tensors) against native."""
    print("\n4. the same, one record: native vs V2 infer (JSON, binary tensors), median of 5")
    feats = scorer.manifest.features
    path = f"/v2/models/{scorer.manifest.name}/infer"
    json_ct = ((b"content-type", b"application/json"),)
    head, blobs = v2_binary_request(rec, feats)
    binary_headers = (
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(head)).encode()),
    )
    for name, route, payload, headers in (
        ("native /v1/score", "/v1/score", body, json_ct),
        ("V2 JSON", path, v2_json_request(rec, feats), json_ct),
        ("V2 binary", path, head + blobs, binary_headers),
    ):
        app = create_app(Settings(bundle=bundle, log_level="warning"))
        us = asyncio.run(asgi_cpu_per_request(app, payload, 64, 4000, 5, route, headers))
        print(f"   {name}: {us:.0f} us")


def explanation_cost(bundle: Path, body: bytes) -> None:
    """5. What explanations that point at the value cost: the same model with its latent
    files and without them (then top features carry no value and expectation)."""
    print("\n5. CPU per single-record /v1/score (explain=3), with expected values and without,")
    print("   64 concurrent (micro-batched) and one at a time")
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare"
        shutil.copytree(bundle, bare)
        raw = json.loads((bare / "manifest.json").read_text())
        raw.pop("explorer", None)
        (bare / "manifest.json").write_text(json.dumps(raw))
        for conc, n in ((64, 4000), (1, 1500)):
            for name, path in (("with expected values", bundle), ("without", bare)):
                app = create_app(Settings(bundle=path, log_level="warning"))
                us = asyncio.run(asgi_cpu_per_request(app, body, conc, n, 5))
                print(f"   c={conc}, {name}: {us:.0f} us")


def _v2_tensors(rec: dict[str, Any], feats: Any) -> list[tuple[str, str, Any]]:
    """(name, datatype, value) per feature present in ``rec``, typed as a Triton user would."""
    out = []
    for f in feats:
        v = rec.get(f.name)
        if v is None:
            continue  # a binary tensor has no null: a missing feature is left out
        if f.kind == "numeric":
            dt = "INT64" if float(v).is_integer() else "FP32"
            out.append((f.name, dt, int(v) if dt == "INT64" else float(v)))
        else:
            out.append((f.name, "BOOL" if f.kind == "boolean" else "BYTES", v))
    return out


def v2_json_request(rec: dict[str, Any], feats: Any) -> bytes:
    inputs = [
        {"name": n, "shape": [1], "datatype": dt, "data": [v]}
        for n, dt, v in _v2_tensors(rec, feats)
    ]
    return orjson.dumps({"inputs": inputs})


def v2_binary_request(rec: dict[str, Any], feats: Any) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a one-record binary request asking for binary outputs."""
    formats = {"INT64": "<q", "FP32": "<f", "BOOL": "<?"}
    inputs, blobs = [], []
    for n, dt, v in _v2_tensors(rec, feats):
        if dt == "BYTES":
            blob = struct.pack("<I", len(v.encode())) + v.encode()
        else:
            blob = struct.pack(formats[dt], v)
        blobs.append(blob)
        inputs.append(
            {"name": n, "shape": [1], "datatype": dt, "parameters": {"binary_data_size": len(blob)}}
        )
    head = orjson.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}})
    return head, b"".join(blobs)


async def asgi_cpu_per_request(
    app: Any,
    body: bytes,
    conc: int,
    n: int,
    repeat: int,
    path: str = "/v1/score",
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),),
) -> float:
    """Median process CPU time (microseconds) per POST ``path`` driven straight into ``app``."""

    async def one() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "state": {},
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        assert status == [200], status

    async def drive(count: int) -> None:
        gate = asyncio.Semaphore(conc)

        async def gated() -> None:
            async with gate:
                await one()

        await asyncio.gather(*(gated() for _ in range(count)))

    async with app.router.lifespan_context(app):
        await drive(500)  # warm-up
        runs = []
        for _ in range(repeat):
            c0 = time.process_time()
            await drive(n)
            runs.append((time.process_time() - c0) / n * 1e6)
    return statistics.median(runs)


if __name__ == "__main__":
    sys.exit(main())
