"""Table columns (pandas) to feature values, by the rules of :mod:`service.values`: training
and bulk scoring read a table's cells exactly as the service reads JSON values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from service import values
from service.values import Invalid

# the files training and bulk scoring read, by extension
FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
UNKNOWN_FORMAT = "unknown file type {suffix!r}; use .csv, .parquet or .jsonl"


def file_format(path: Path) -> str | None:
    """``csv``, ``parquet`` or ``jsonl`` by the file's extension; None for any other."""
    return FORMATS.get(path.suffix.lower())


def column(
    kind: str, s: pd.Series, max_len: int | None = None
) -> tuple[np.ndarray, dict[int, Invalid]]:
    """The canonical values of a column of ``kind`` (float64 with NaN = missing; for a
    categorical, str or None) and its invalid cells (row position -> why)."""
    is_bool = pd.api.types.is_bool_dtype(s.dtype)
    if kind != "categorical" and (is_bool or pd.api.types.is_numeric_dtype(s.dtype)):
        out = s.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        bad = np.flatnonzero(np.isinf(out))
        out[bad] = np.nan
        return out, {int(i): Invalid("not_finite", "must be a finite number") for i in bad}
    parsed: list[object] = []
    errors: dict[int, Invalid] = {}
    for i, v in enumerate(s.tolist()):
        try:
            missing = v is None or v is pd.NA or (isinstance(v, float) and v != v)
            parsed.append(values.parse(kind, None if missing else v, max_len))
        except Invalid as e:
            errors[i] = e
            parsed.append(None)
    if kind == "categorical":
        return np.array(parsed, dtype=object), errors
    return np.array([np.nan if v is None else v for v in parsed], dtype=np.float64), errors


def is_boolean(s: pd.Series) -> bool:
    """For type inference: only true/false values (or words: yes/no, ...), never numbers."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return True
    if pd.api.types.is_numeric_dtype(s.dtype):
        return False
    present = s.dropna()
    return len(present) > 0 and all(map(values.is_boolean_value, present.tolist()))
