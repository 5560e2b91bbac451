"""Bulk scoring of a file, offline: ``vae-anomaly score BUNDLE_OR_REGISTRY DATA --out FILE``.

Reads CSV, Parquet or JSON Lines in chunks and writes, chunk by chunk, the id columns plus
``score``, ``is_anomaly``, ``percentile``, ``unusual`` and ``error`` — so memory stays flat
whatever the file's size. The output goes to a temporary file renamed into place at the end.
Values are read by the service's rules (service/values.py): a value the model never saw is
scored and named in ``unusual``; a row holding a value that cannot be one of its column's
(text in a numeric column, a JSON line that is not an object) is not scored and says why in
``error``. Needs pandas and pyarrow (the ``batch`` extra, part of ``train``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from service import tables, values
from service.bundle import Bundle, Manifest, read_bundle
from service.features import Encoder, Percentiles
from service.registry import Registry
from service.runtime import OnnxModel
from service.values import Found, never_normal

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


OUTPUTS = ("score", "is_anomaly", "percentile", "unusual", "error")
OUTPUT_TYPES = {
    "score": pa.float64(),
    "is_anomaly": pa.bool_(),
    "percentile": pa.float64(),
    "unusual": pa.string(),
    "error": pa.string(),
}


def read_chunks(path: Path, size: int) -> Iterator[tuple[pd.DataFrame, dict[int, str]]]:
    """Chunks of records, each with the rows that are no record at all (row -> why)."""
    kind = _format(path)
    if not path.is_file():
        raise BatchError(f"{path}: no such file")
    if kind == "csv":
        for chunk in pd.read_csv(path, chunksize=size):
            yield chunk, {}
    elif kind == "jsonl":
        yield from _jsonl_chunks(path, size)
    else:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=size):
            yield rb.to_pandas(), {}


def _jsonl_record(line: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            rec = json.loads(line)  # NaN, Infinity, integers beyond 64 bits
        except (ValueError, RecursionError):
            return {}, "not valid JSON"
    if not isinstance(rec, dict):
        return {}, f"not a JSON object (a JSON {type(rec).__name__})"
    return rec, None


def _jsonl_chunks(path: Path, size: int) -> Iterator[tuple[pd.DataFrame, dict[int, str]]]:
    rows: list[dict[str, Any]] = []
    bad: dict[int, str] = {}
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec, why = _jsonl_record(line)
            if why:
                bad[len(rows)] = f"line {number}: {why}"
            rows.append(rec)
            if len(rows) == size:
                yield _frame(rows), bad
                rows, bad = [], {}
    if rows:
        yield _frame(rows), bad


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=pd.RangeIndex(len(rows)))  # a row even for {}


class Writer:
    def __init__(self, path: Path) -> None:
        self.kind = _format(path)
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.first = True
        self.parquet: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def write(self, df: pd.DataFrame) -> None:
        if self.kind == "csv":
            df.to_csv(self.tmp, mode="w" if self.first else "a", header=self.first, index=False)
        elif self.kind == "jsonl":
            with self.tmp.open("w" if self.first else "a") as f:
                df.to_json(f, orient="records", lines=True)
        else:
            self._write_parquet(df)
        self.first = False

    def _write_parquet(self, df: pd.DataFrame) -> None:
        """Every chunk in the first chunk's schema (the outputs' types fixed, ids' as first
        seen), or a clear error when an id column's values no longer fit it."""
        if self.parquet is None:
            schema = pa.Table.from_pandas(df, preserve_index=False).schema
            for name, typ in OUTPUT_TYPES.items():
                schema = schema.set(schema.get_field_index(name), pa.field(name, typ))
            self.parquet, self.schema = pq.ParquetWriter(self.tmp, schema), schema
        schema = self.schema
        try:
            table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
            raise BatchError(
                f"an id column changes type between chunks ({e}); the Parquet output needs one "
                "type per column: write CSV or JSON Lines, or choose other --id-column(s)"
            ) from None
        self.parquet.write_table(table)

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
    invalid: int = 0  # rows not scored (see their ``error``)
    seconds: float = 0.0
    unusual: dict[str, int] = field(default_factory=dict)  # column -> unusual values
    missing_columns: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _id_columns(chunk: pd.DataFrame, m: Manifest, ids: list[str] | None, data: Path) -> list[str]:
    """The id columns to copy (checked on the first chunk), the required feature columns there."""
    absent = [f.name for f in m.features if f.name not in chunk.columns and not f.nullable]
    if absent:
        raise BatchError(f"{data}: no column(s) {absent}, which the model needs")
    id_cols = ids if ids is not None else [c for c in m.ignored_columns if c in chunk.columns]
    unknown_ids = [c for c in id_cols if c not in chunk.columns]
    if unknown_ids:
        raise BatchError(f"{data}: no id column(s) {unknown_ids}")
    clash = [c for c in id_cols if c in OUTPUTS]
    if clash:
        raise BatchError(
            f"id column(s) {clash} would be overwritten by the output column(s) of the same "
            f"name {list(OUTPUTS)}; choose the id columns with --id-column"
        )
    return id_cols


def _read_columns(
    chunk: pd.DataFrame, m: Manifest, errors: dict[int, str]
) -> dict[str, np.ndarray]:
    """Each feature's values by the service's rules; adds each invalid cell to ``errors``."""
    columns: dict[str, np.ndarray] = {}
    for f in m.features:
        if f.name not in chunk.columns:
            columns[f.name] = np.full(
                len(chunk),
                None if f.kind == "categorical" else np.nan,
                dtype=object if f.kind == "categorical" else float,
            )
            continue
        columns[f.name], bad = tables.column(f.kind, chunk[f.name])
        for i, e in bad.items():
            errors[i] = (errors[i] + "; " if i in errors else "") + f"{f.name}: {e.message}"
    return columns


def _unusual_text(
    m: Manifest, found: Found | None, columns: dict[str, np.ndarray], n: int
) -> list[Any]:
    """Per row: the unusual values as ``field=value (why)``, joined by "; " (None: none)."""
    out: list[Any] = [None] * n
    feats = {f.name: f for f in m.features}
    for name, kind, rows in found.items if found is not None else ():
        why = values.why(feats[name], kind)
        for i in rows.nonzero()[0].tolist():
            text = f"{name}={_show(columns[name][i])} ({why})"
            out[i] = text if out[i] is None else f"{out[i]}; {text}"
    return out


def _show(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "null"
    return repr(v) if isinstance(v, str) else f"{float(v):g}"


def _integer_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Integer ids that pandas read as floats (a chunk with an empty id) stay integers."""
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_float_dtype(col.dtype):
            present = col.dropna()
            if len(present) and (present == present.round()).all() and present.abs().max() < 2**53:
                df[c] = col.astype("Int64")
    return df


class _Chunks:
    """Scores chunks with one model: the encoder, the session, the threshold, percentiles."""

    def __init__(self, bundle: Bundle, st: str, threads: int) -> None:
        m = self.m = bundle.manifest
        self.encode, self.percentile = Encoder(m.features), Percentiles(m)
        self.model = OnnxModel(bundle.model_path, intra_op_threads=threads or (os.cpu_count() or 1))
        self.st, self.thr = st, m.thresholds[st].value  # type: ignore[index]
        self.unusual: dict[str, int] = {}  # column -> unusual values in the last chunk

    def score(self, chunk: pd.DataFrame, bad: dict[int, str], id_cols: list[str]) -> pd.DataFrame:
        n = len(chunk)
        errors = dict(bad)
        columns = _read_columns(chunk, self.m, errors)
        ok = np.ones(n, dtype=bool)
        ok[list(errors)] = False
        score = np.full(n, np.nan)
        unusual: list[Any] = [None] * n
        if ok.any():
            valid = {k: v[ok] for k, v in columns.items()}
            enc = self.encode(valid)
            scores = self.model.run(enc.inputs)[self.st].astype(np.float64)
            score[ok] = never_normal(scores, enc.unusual, self.thr)
            for name, _, rows in enc.unusual.items if enc.unusual else ():
                self.unusual[name] = self.unusual.get(name, 0) + int(rows.sum())
            texts = _unusual_text(self.m, enc.unusual, valid, int(ok.sum()))
            for i, t in zip(np.flatnonzero(ok).tolist(), texts, strict=True):
                unusual[i] = t
        # a JSON Lines chunk may lack an id column (its records left it out): empty ids there
        result = _integer_ids(chunk.reindex(columns=id_cols))
        result["score"] = score
        flagged = pd.array(score > self.thr, dtype="boolean")
        flagged[~ok] = pd.NA  # not scored
        result["is_anomaly"] = flagged
        result["percentile"] = np.where(ok, np.round(self.percentile(self.st, score), 3), np.nan)
        result["unusual"] = pd.array(unusual, dtype=object)
        result["error"] = pd.array([errors.get(i) for i in range(n)], dtype=object)
        return result


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
    scorer = _Chunks(bundle, st, threads)
    summary = Summary()
    id_cols: list[str] = []
    writer = Writer(out)
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="scoring", unit=" rows", unit_scale=True, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for chunk, bad in read_chunks(data, chunk_size):
            if summary.rows == 0:
                id_cols = _id_columns(chunk, m, ids, data)
                summary.missing_columns = [f.name for f in m.features if f.name not in chunk]
            result = scorer.score(chunk.reset_index(drop=True), bad, id_cols)
            writer.write(result)
            for name, count in scorer.unusual.items():
                summary.unusual[name] = summary.unusual.get(name, 0) + count
            scorer.unusual.clear()
            summary.rows += len(chunk)
            summary.anomalies += int(result["is_anomaly"].sum())
            summary.invalid += int(result["error"].notna().sum())
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
