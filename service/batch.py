"""Bulk scoring of a file, offline: ``vae-anomaly score BUNDLE_OR_REGISTRY DATA --out FILE``.

Reads CSV, Parquet or JSON Lines in chunks and writes, chunk by chunk, the id columns plus
``score``, ``is_anomaly`` and ``percentile`` — so memory stays flat whatever the file's size.
The output goes to a temporary file renamed into place at the end. A value that cannot be read
(text in a numeric column, say) is scored as missing and counted in the summary.
Needs pandas and pyarrow (the ``batch`` extra, part of ``train``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from service import tables
from service.bundle import Bundle, read_bundle
from service.cpus import usable_cpus
from service.features import Encoder, Percentiles
from service.registry import Registry
from service.runtime import OnnxModel

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


class BatchError(ValueError):
    """A bulk scoring job that cannot run, with the reason."""


def resolve(path: str | os.PathLike[str]) -> Bundle:
    """A bundle directory, or a registry (its serving version)."""
    p = Path(path)
    if (p / "versions").is_dir():
        return Registry(p).read_serving()
    return read_bundle(p)


def _format(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BatchError(f"{path}: unknown file type {path.suffix!r}; use .csv, .parquet or .jsonl")
    return kind


def read_chunks(path: Path, size: int) -> Iterator[pd.DataFrame]:
    kind = _format(path)
    if not path.is_file():
        raise BatchError(f"{path}: no such file")
    if kind == "csv":
        yield from pd.read_csv(path, chunksize=size)
    elif kind == "jsonl":
        yield from pd.read_json(path, lines=True, chunksize=size)
    else:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield rb.to_pandas()


class Writer:
    def __init__(self, path: Path) -> None:
        self.kind = _format(path)
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.first = True
        self.parquet: pq.ParquetWriter | None = None

    def write(self, df: pd.DataFrame) -> None:
        if self.kind == "csv":
            df.to_csv(self.tmp, mode="w" if self.first else "a", header=self.first, index=False)
        elif self.kind == "jsonl":
            with self.tmp.open("w" if self.first else "a") as f:
                df.to_json(f, orient="records", lines=True)
        else:
            table = pa.Table.from_pandas(df, preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.tmp, table.schema)
            self.parquet.write_table(table)
        self.first = False

    def commit(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        with self.tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Summary:
    rows: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    unreadable: dict[str, int] = field(default_factory=dict)  # column -> values scored missing
    missing_columns: list[str] = field(default_factory=list)
    threads: int = 0  # onnxruntime threads

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def score_file(
    bundle: Bundle,
    data: Path,
    out: Path,
    *,
    ids: list[str] | None = None,
    score_type: str | None = None,
    chunk_size: int = 100_000,
    threads: int = 0,
    progress: bool = True,
) -> Summary:
    """Score every record of ``data`` into ``out``; see the module's docstring."""
    m = bundle.manifest
    st = score_type or m.default_score
    if st not in m.score_types:
        raise BatchError(f"score type {st!r} is not one of {m.score_types}")
    if out.resolve() == data.resolve():
        raise BatchError("--out must not be the input file")
    encode, percentile = Encoder(m.features), Percentiles(m)
    threads = threads or usable_cpus()  # not os.cpu_count(): the host's, beyond a quota
    model = OnnxModel(bundle.model_path, intra_op_threads=threads)
    thr = m.thresholds[st].value
    summary = Summary(threads=threads)
    id_cols: list[str] = []
    writer = Writer(out)
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="scoring", unit=" rows", unit_scale=True, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for chunk in read_chunks(data, chunk_size):
            if summary.rows == 0:
                absent = [f.name for f in m.features if f.name not in chunk.columns]
                required = [
                    n for n in absent if not next(f for f in m.features if f.name == n).nullable
                ]
                if required:
                    raise BatchError(f"{data}: no column(s) {required}, which the model needs")
                summary.missing_columns = absent
                id_cols = (
                    ids if ids is not None else [c for c in m.ignored_columns if c in chunk.columns]
                )
                unknown_ids = [c for c in id_cols if c not in chunk.columns]
                if unknown_ids:
                    raise BatchError(f"{data}: no id column(s) {unknown_ids}")
            columns: dict[str, Any] = {}
            for f in m.features:
                if f.name not in chunk.columns:
                    columns[f.name] = np.full(
                        len(chunk),
                        None if f.kind == "categorical" else np.nan,
                        dtype=object if f.kind == "categorical" else float,
                    )
                    continue
                s = chunk[f.name]
                if f.kind == "categorical":
                    columns[f.name] = tables.to_category(s)
                    continue
                values, bad = tables.to_bool(s) if f.kind == "boolean" else tables.to_float(s)
                if bad.any():
                    summary.unreadable[f.name] = summary.unreadable.get(f.name, 0) + int(bad.sum())
                columns[f.name] = values
            outputs = model.run(encode(columns).inputs)
            scores = outputs[st].astype(np.float64)
            result = chunk[id_cols].copy() if id_cols else pd.DataFrame(index=chunk.index)
            result["score"] = scores
            result["is_anomaly"] = scores > thr
            result["percentile"] = np.round(percentile(st, scores), 3)
            writer.write(result)
            summary.rows += len(chunk)
            summary.anomalies += int(result["is_anomaly"].sum())
            if bar is not None:
                bar.update(len(chunk))
        if summary.rows == 0:
            raise BatchError(f"{data}: no records")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
