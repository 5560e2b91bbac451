"""Spark's overhead, measured: the same rows through the local bulk CLI and through Spark.

    python bench/spark.py [--rows 10000000] [--parts 10] [--master local[2]]

Trains the demo model (payments, a few epochs), writes ``--rows`` payments as ``--parts``
Parquet files, then times, on the same cores, one after the other:
1. ``vae-anomaly score MODEL all.parquet --out local.parquet`` (the local engine, one process);
2. ``vae-anomaly score MODEL 'parts/*.parquet' --out spark/ --engine spark --master local[2]``.
Prints rows/s of each and the ratio; the JVM's start-up is inside (2), as a user would pay it.
Needs the dev extra (pyspark) and Java 17.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from training.config import TrainConfig
from training.demo_data import generate_payments
from training.train import train_bundle

EXE = str(Path(sys.executable).parent / "vae-anomaly")
ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([EXE, *args], check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def write_rows(root: Path, rows: int, parts: int) -> Path:
    """``parts`` Parquet files under root/parts and one file root/all.parquet of the same rows."""
    (root / "parts").mkdir()
    per = rows // parts
    with pq.ParquetWriter(root / "all.parquet", pa.Table.from_pandas(
        generate_payments(10, seed=0), preserve_index=False
    ).schema) as whole:  # fmt: skip
        for i in range(parts):
            table = pa.Table.from_pandas(generate_payments(per, seed=100 + i), preserve_index=False)
            pq.write_table(table, root / "parts" / f"part-{i:03d}.parquet")
            whole.write_table(table)
            print(f"wrote part {i + 1}/{parts}", file=sys.stderr)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--master", default="local[2]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = TrainConfig(exclude=["transaction_id"], epochs=5, threads=1, name="payments")
        train_bundle(generate_payments(20_000, seed=1), root / "model", cfg, source="bench",
                     data_fingerprint="bench", progress=False)  # fmt: skip
        write_rows(root, a.rows, a.parts)
        rows = a.rows // a.parts * a.parts
        model = str(root / "model")
        local = timed(["score", model, str(root / "all.parquet"), "--out",
                       str(root / "local.parquet"), "--quiet"])  # fmt: skip
        spark = timed(["score", model, str(root / "parts" / "*.parquet"), "--out",
                       str(root / "spark"), "--engine", "spark", "--master", a.master])  # fmt: skip
    print("| engine | rows | seconds | rows/s |\n|---|---|---|---|")
    print(f"| local (1 process) | {rows:,} | {local:.1f} | {rows / local:,.0f} |")
    print(f"| spark {a.master} | {rows:,} | {spark:.1f} | {rows / spark:,.0f} |")
    print(f"Spark at {local / spark:.2f}x the local engine's speed on the same cores")


if __name__ == "__main__":
    main()
