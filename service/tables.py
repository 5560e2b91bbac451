"""Turning table columns (pandas) into feature values: one place for training and bulk scoring.

Each parser returns the values and a mask of entries it could not read (present, but not of
the type); missing entries (None/NaN/empty) are not bad, they are missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

TRUE = {"true", "t", "yes", "y", "1", "1.0"}
FALSE = {"false", "f", "no", "n", "0", "0.0"}


def to_float(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Numbers as float64 (NaN = missing); infinities count as bad."""
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        out = s.astype(float).to_numpy(copy=True)
        bad = np.isinf(out)
    else:
        out = pd.to_numeric(s, errors="coerce").astype(float).to_numpy(copy=True)
        bad = (np.isnan(out) & s.notna().to_numpy()) | np.isinf(out)
    out[bad] = np.nan
    return out, bad


def to_bool(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """0.0/1.0 (NaN = missing) from booleans, 0/1 numbers or true/false/yes/no strings."""
    present = s.notna().to_numpy()
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.where(present, s.fillna(False).astype(float), np.nan), np.zeros(len(s), bool)
    if pd.api.types.is_numeric_dtype(s.dtype):
        v = s.astype(float).to_numpy(copy=True)
        bad = present & ~np.isin(v, (0.0, 1.0))
        v[bad] = np.nan
        return v, bad
    low = s.astype(str).str.strip().str.lower().to_numpy()
    is_true, is_false = np.isin(low, list(TRUE)), np.isin(low, list(FALSE))
    out = np.where(is_true, 1.0, np.where(is_false, 0.0, np.nan))
    return np.where(present, out, np.nan), present & ~(is_true | is_false)


def to_category(s: pd.Series) -> np.ndarray:
    """Strings (None = missing); integer-valued floats print as integers (3.0 -> "3")."""

    def fmt(v: Any) -> str | None:
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            return None
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return np.array([fmt(v) for v in s.tolist()], dtype=object)


def is_boolean(s: pd.Series) -> bool:
    """True if every present value reads as a boolean (for type inference)."""
    return not to_bool(s)[1].any()
