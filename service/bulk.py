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

import glob
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from service import values
from service.api import OUTPUTS, Model, score_type_of
from service.bundle import Bundle, Manifest, client_fields
from service.cpus import usable_cpus
from service.errors import VaeAnomalyError
from service.tables import UNKNOWN_FORMAT, file_format


class BatchError(VaeAnomalyError, ValueError):
    """A bulk scoring job that cannot run, with the reason."""


def _format(path: Path) -> str:
    kind = file_format(path)
    if kind is None:
        raise BatchError(f"{path}: " + UNKNOWN_FORMAT.format(suffix=path.suffix))
    return kind


OUTPUT_TYPES = {
    "score": pa.float64(),
    "is_anomaly": pa.bool_(),
    "percentile": pa.float64(),
    "unusual": pa.string(),
    "error": pa.string(),
    "top_features": pa.string(),  # with --explain
}


def input_files(data: str | os.PathLike[str]) -> list[Path]:
    """The files of ``data``: a file; a folder (a partitioned dataset: every data file under
    it, Spark's and Hive's ``_``/``.`` files left out); or a glob (``'in/*.parquet'``). All of
    one format, in name order."""
    text = str(data)
    p = Path(text)
    if any(c in text for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
    elif p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and not any(part.startswith(("_", ".")) for part in f.relative_to(p).parts)
        )
    else:
        return [p]
    if not files:
        raise BatchError(f"{text}: no files to read")
    kinds = {_format(f) for f in files}
    if len(kinds) > 1:
        raise BatchError(f"{text}: files of several formats {sorted(kinds)}; give one format")
    return files


def read_chunks(path: Path, size: int) -> Iterator[tuple[pd.DataFrame, dict[int, str]]]:
    """Chunks of records, each with the rows that are no record at all (row -> why)."""
    kind = _format(path)
    if not path.is_file():
        raise BatchError(f"{path}: no such file")
    if kind == "jsonl":  # read line by line: a line that is no record is one row's error
        yield from _jsonl_chunks(path, size)
        return
    try:
        if kind == "csv":
            for chunk in pd.read_csv(path, chunksize=size):
                yield chunk, {}
        else:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=size):
                yield rb.to_pandas(), {}
    # how pandas and pyarrow say a file is not what its name says (ParserError, invalid UTF-8,
    # ArrowInvalid: all ValueErrors): the file's fault, not ours
    except (ValueError, pa.ArrowException) as e:
        raise BatchError(f"{path}: cannot read it as {kind.upper()}: {e}") from e


def _jsonl_record(line: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        rec = values.json_loads(line)
    except ValueError:
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
                if name in schema.names:
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
    threads: int = 0  # onnxruntime threads

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _id_columns(
    chunk: pd.DataFrame, m: Manifest, ids: list[str] | None, data: str | os.PathLike[str]
) -> list[str]:
    """The id columns to copy (checked on the first chunk)."""
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


def _integer_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Integer ids that pandas read as floats (a chunk with an empty id) stay integers."""
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_float_dtype(col.dtype):
            present = col.dropna()
            if len(present) and (present == present.round()).all() and present.abs().max() < 2**53:
                df[c] = col.astype("Int64")
    return df


def score_file(
    bundle: Bundle,
    data: str | os.PathLike[str],
    out: Path,
    *,
    ids: list[str] | None = None,
    score_type: str | None = None,
    chunk_size: int = 100_000,
    threads: int = 0,
    explain: int = 0,
    progress: bool = True,
) -> Summary:
    """Score every record of ``data`` (a file, a folder or a glob: :func:`input_files`) into
    ``out``; see the module's docstring. ``explain``: a ``top_features`` column of that many."""
    m = bundle.manifest
    try:
        st = score_type_of(m, score_type)
    except ValueError as e:
        raise BatchError(str(e)) from None
    files = input_files(data)
    if any(out.resolve() == f.resolve() for f in files):
        raise BatchError("--out must not be an input file")
    threads = threads or usable_cpus()  # not os.cpu_count(): the host's, beyond a quota
    model = Model(bundle, threads=threads)
    summary = Summary(threads=threads)
    id_cols: list[str] = []
    writer = Writer(out)
    bar: Any = None
    if progress:
        bar = tqdm(desc="scoring", unit=" rows", unit_scale=True, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for chunk, bad in (c for f in files for c in read_chunks(f, chunk_size)):
            if summary.rows == 0:
                id_cols = _id_columns(chunk, m, ids, data)
                summary.missing_columns = [n for n in client_fields(m) if n not in chunk]
            chunk = chunk.reset_index(drop=True)
            scored, unusual = model.score_frame(chunk, bad, st, explain)
            # a JSON Lines chunk may lack an id column (its records left it out): empty ids there
            result = pd.concat([_integer_ids(chunk.reindex(columns=id_cols)), scored], axis=1)
            writer.write(result)
            for name, count in unusual.items():
                summary.unusual[name] = summary.unusual.get(name, 0) + count
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
