"""The performance harness: the serving and bulk figures of docs/performance.md, in one run.

    python bench/run.py [--rows 100000] [--bulk-rows 1000000] [--seconds 5] [--epochs 10]

On a 30-feature model trained here on synthetic telemetry (22 numeric with skew and missing
values, 4 boolean, 4 categorical):
1. raw onnxruntime rows/s at batch 1, 64, 4096 (1 and 2 intra-op threads): the ceiling;
2. the service (1 worker), single-record requests at concurrency 1, 8, 64: requests/s, p50, p99;
3. the service, 1,000-record requests: records/s, and the ratio to (1) at batch 4096;
4. the naive torch service (bench/naive_service.py), same load as (2);
5. a trivial FastAPI endpoint returning a constant, same load: the HTTP ceiling;
6. `vae-anomaly score` rows/s on a Parquet file, against (1);
7. training seconds per epoch per 100k rows and peak memory, against PyOD's VAE (if installed).
Load comes from wrk (Debian package) on 127.0.0.1, 1 thread; the server and wrk share the
machine's cores. Ratios are from this one run; medians where repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from microbatch import free_port, wrk  # type: ignore[import-not-found]
from serving_profile import median_ms  # type: ignore[import-not-found]

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "vae-anomaly"
LUA = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[%s]]\n'


def telemetry(n: int, seed: int) -> pd.DataFrame:
    """30 features of server telemetry driven by 4 hidden factors."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    w = np.random.default_rng(12345).normal(size=(4, 22))  # the same system for every seed
    x = z @ w + 0.3 * rng.normal(size=(n, 22))
    df = pd.DataFrame({f"m{i:02d}": x[:, i] for i in range(22)})
    for i in range(4):  # skewed, positive metrics
        df[f"m{i:02d}"] = np.round(np.exp(x[:, i] / 2), 4)
    for i in (20, 21):
        df.loc[rng.random(n) < 0.05, f"m{i:02d}"] = np.nan
    for i in range(4):
        df[f"flag{i}"] = (z[:, i] + 0.5 * rng.normal(size=n)) > 0.8
    levels = np.array(list("abcdefgh"))
    for i in range(4):
        idx = np.clip(((z[:, i] + 2.5) / 5 * 8).astype(int), 0, 7)
        df[f"cat{i}"] = levels[idx]
    df.insert(0, "host_id", [f"h{seed}-{i}" for i in range(n)])
    return df


def median_rate(fn: Any, rows: int, repeat: int) -> float:
    return rows / median_ms(fn, repeat) * 1000


def start(cmd: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"records": []}, timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="training rows")
    p.add_argument("--bulk-rows", type=int, default=1_000_000)
    p.add_argument("--seconds", type=int, default=5, help="per load test")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; work dir {tmp}",
        flush=True,
    )
    train = measure_training(tmp, a.rows, a.epochs)  # first: it also makes the model
    pyod = measure_pyod(tmp / "train.parquet", a.epochs)
    probe = telemetry(4096, 1)
    ceiling = measure_onnxruntime(tmp / "model", probe)
    load, thousand = measure_servers(tmp, probe, a.seconds, ceiling)
    bulk = measure_bulk(tmp, a.bulk_rows, ceiling)

    print("\nratios (targets in parentheses):")
    print(
        f"  single-record req/s at c=64 vs trivial endpoint: "
        f"{load[('ours', 64)][0] / load[('trivial', 64)][0]:.0%} (>= 60%)"
    )
    print(f"  1,000-record requests vs raw onnxruntime at 4096: {thousand / ceiling:.0%} (>= 30%)")
    print(
        f"  ours vs naive torch service at c=64: "
        f"{load[('ours', 64)][0] / load[('naive torch', 64)][0]:.1f}x (>= 3x)"
    )
    print(f"  p99 at c=8: {load[('ours', 8)][2]:.1f} ms (< 20 ms)")
    print(f"  bulk scoring vs raw onnxruntime: {bulk / ceiling:.0%} (>= 50%)")
    if pyod is not None:
        print(f"  training time per epoch vs PyOD VAE: {train / pyod:.2f}x")
    return 0


def measure_training(tmp: Path, rows: int, epochs: int) -> float:
    """7. Train the model (tmp/model) on tmp/train.parquet; seconds per epoch per 100k rows."""
    data = tmp / "train.parquet"
    telemetry(rows, 0).to_parquet(data, index=False)
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(EXE),
            "train",
            str(data),
            "--out",
            str(tmp / "model"),
            "--epochs",
            str(epochs),
            "--exclude",
            "host_id",
            "--quiet",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    peak_ours = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((tmp / "model" / "manifest.json").read_text())
    per_epoch = float(
        manifest["metrics"]["train_seconds"]
        / manifest["metrics"]["epochs_run"]
        / (manifest["data"]["train_rows"] / 100_000)
    )
    print(
        f"7. ours: {per_epoch:.2f} s/epoch/100k rows, peak {peak_ours:.0f} MB "
        f"(whole command {wall:.0f} s)",
        flush=True,
    )
    return per_epoch


def measure_pyod(data: Path, epochs: int) -> float | None:
    """7. PyOD's VAE on the same data: seconds per epoch per 100k rows (None if not installed)."""
    pyod = subprocess.run(
        [sys.executable, "-c", PYOD, str(data), str(epochs)], capture_output=True, text=True
    )
    if pyod.returncode != 0:
        print(f"   PyOD VAE: not run ({pyod.stderr.strip().splitlines()[-1]})", flush=True)
        return None
    pyod_epoch, pyod_peak = (float(x) for x in pyod.stdout.split())
    print(f"   PyOD VAE: {pyod_epoch:.2f} s/epoch/100k rows, peak {pyod_peak:.0f} MB", flush=True)
    return pyod_epoch


def measure_onnxruntime(model: Path, probe: pd.DataFrame) -> float:
    """1. Raw onnxruntime rows/s by threads and batch; returns the best at batch 4096."""
    from service.bundle import read_bundle
    from service.features import encode_columns
    from service.runtime import OnnxModel

    bundle = read_bundle(model)
    feats = bundle.manifest.features
    inputs = encode_columns(feats, {f.name: probe[f.name].to_numpy() for f in feats}).inputs
    raw: dict[tuple[int, int], float] = {}
    for threads in (1, 2):
        sess = OnnxModel(bundle.model_path, intra_op_threads=threads)
        for n in (1, 64, 4096):
            part = {k: v[:n] for k, v in inputs.items()}
            raw[(threads, n)] = median_rate(
                lambda s=sess, x=part: s.run(x), n, 300 if n < 4096 else 30
            )
            print(
                f"1. onnxruntime {threads} thread(s), batch {n}: {raw[(threads, n)]:,.0f} rows/s",
                flush=True,
            )
    return max(raw[(1, 4096)], raw[(2, 4096)])


def server_commands(model: Path) -> dict[str, Any]:
    """The servers under load: ours, the naive torch one, a trivial constant endpoint."""
    naive = [sys.executable, str(HERE / "naive_service.py")]
    return {
        "ours": lambda port: [
            str(EXE),
            "serve",
            "--bundle",
            str(model),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        "naive torch": lambda port: [*naive, "naive", str(model), str(port)],
        "trivial": lambda port: [*naive, "trivial", str(model), str(port)],
    }


def measure_servers(
    tmp: Path, probe: pd.DataFrame, seconds: int, ceiling: float
) -> tuple[dict[tuple[str, int], tuple[float, float, float]], float]:
    """2-5. Each server under wrk: (req/s, p50, p99) by (server, concurrency), and (3) our
    records/s with 1,000-record requests."""
    one = tmp / "one.lua"
    one.write_text(LUA % json.dumps({"records": records(probe.iloc[:1])}))
    thousand = tmp / "thousand.lua"
    thousand.write_text(LUA % json.dumps({"records": records(probe.iloc[:1000])}))
    load: dict[tuple[str, int], tuple[float, float, float]] = {}
    thousand_rate = 0.0
    for name, cmd in server_commands(tmp / "model").items():
        port = free_port()
        proc = start(cmd(port), port)
        url = f"http://127.0.0.1:{port}/v1/score"
        try:
            for c in (1, 8, 64):
                load[(name, c)] = wrk(url, one, c, seconds)
                rps, p50, p99 = load[(name, c)]
                print(
                    f"2. {name}, 1 record, c={c}: {rps:,.0f} req/s, p50 {p50:.2f} ms, "
                    f"p99 {p99:.2f} ms",
                    flush=True,
                )
            if name == "ours":
                rps, p50, p99 = wrk(url, thousand, 2, seconds)
                thousand_rate = rps * 1000
                print(
                    f"3. ours, 1,000 records, c=2: {rps * 1000:,.0f} records/s "
                    f"({rps * 1000 / ceiling:.0%} of raw onnxruntime at batch 4096)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()
    return load, thousand_rate


def measure_bulk(tmp: Path, bulk_rows: int, ceiling: float) -> float:
    """6. `vae-anomaly score` rows/s on a Parquet file of ``bulk_rows`` records."""
    bulk_in = tmp / "bulk.parquet"
    pieces = []
    for i in range(0, bulk_rows, 500_000):
        pieces.append(telemetry(min(500_000, bulk_rows - i), 10 + i))
    pd.concat(pieces, ignore_index=True).to_parquet(bulk_in, index=False)
    del pieces
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(EXE),
            "score",
            str(tmp / "model"),
            str(bulk_in),
            "--out",
            str(tmp / "scored.parquet"),
            "--quiet",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    bulk = bulk_rows / (time.perf_counter() - t0)
    peak_bulk = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"6. vae-anomaly score: {bulk:,.0f} rows/s over {bulk_rows:,} rows "
        f"({bulk / ceiling:.0%} of raw onnxruntime at batch 4096; peak RSS of any child so "
        f"far {peak_bulk:.0f} MB)",
        flush=True,
    )
    return bulk


PYOD = r"""
import resource, sys, time
import numpy as np, pandas as pd
from pyod.models.vae import VAE
df = pd.read_parquet(sys.argv[1]).drop(columns=["host_id"])
text = [c for c in df if not pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])]
df = pd.get_dummies(df, columns=text).astype(float)
X = df.fillna(df.median()).to_numpy()
epochs = int(sys.argv[2])
t0 = time.perf_counter()
VAE(epoch_num=epochs, verbose=0, random_state=0).fit(X)
per_epoch = (time.perf_counter() - t0) / epochs / (len(X) / 100_000)
print(per_epoch, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

if __name__ == "__main__":
    sys.exit(main())
