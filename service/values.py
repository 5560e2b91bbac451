"""What a value of each kind of feature may be, what it means to the model, and when it is
unusual: the one set of rules for training, ``/v1/score``, V2 infer and ``vae-anomaly score``.

:func:`parse` reads one value (JSON, or a cell of a table) into its canonical form, or raises
:class:`Invalid` when it cannot be a value of that kind of column at all:

- numeric: a number, or text that is a plain decimal number (``"42.5"``, ``"-1e3"``; a CSV cell
  is text). Not ``true``/``false``, not ``"100,000.00"`` or ``"$100"``, not NaN or infinity.
  A number beyond a double (JSON's ``1e400``, an integer of 400 digits) is still a number, held
  as the largest double of its sign: far out of any training range, scored and flagged.
- boolean: ``true``/``false``; the words true/false, t/f, yes/no, y/n, on/off (lower, Title or
  UPPER case); a number (1 and 0 mean true and false; any other number is unusual).
- categorical: text, or a number (written as its decimal text: ``7`` and ``7.0`` are ``"7"``;
  the text length limit is for text).

``None`` (a table's empty cell: NaN) and, for numbers and booleans, empty text are *missing*,
never invalid; a NaN *value* (JSON's non-standard ``NaN``) is not a number. What is
unusual — a value the model has never seen — is decided for a whole batch at once by
:class:`Checker` (see :data:`WHY`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from service.bundle import (
    MISSING_INDEX,
    UNKNOWN_INDEX,
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
)

_TRUE, _FALSE = ("true", "t", "yes", "y", "on"), ("false", "f", "no", "n", "off")
# each word as written in lower case, Title case or UPPER case (not mixed: "yEs" is no word)
TRUE_WORDS = frozenset(w for base in _TRUE for w in (base, base.title(), base.upper()))
FALSE_WORDS = frozenset(w for base in _FALSE for w in (base, base.title(), base.upper()))
# a number written as text: what a CSV cell holds; also the OpenAPI schema's pattern (matched as
# JSON Schema validators in Python do, by re.search)
# (empty: missing)
NUMBER_PATTERN = (
    r"^(?:[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,2})?)?$"
)
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT_MAX = float(np.finfo(np.float64).max)
# a categorical column is *stable* when at most this share of the held-out normal records held
# a value outside its vocabulary; an unseen value there is then unusual enough to flag
STABLE_UNSEEN_RATE = 0.001

# kind of unusual value -> why, as reported in ``unusual_values``
WHY = {
    "missing": "missing, but never missing in training",
    "out_of_range": "far outside the training range",
    "not_boolean": "a number other than 0 or 1 in a true/false column",
    "unseen_category": "never seen in training",
}

AnyFeature = NumericFeature | BooleanFeature | CategoricalFeature


class Invalid(ValueError):
    """A value that cannot be a value of its column: ``reason`` as in the 422 body."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _number(v: Any, what: str) -> float | None:
    """A JSON number or numeric text as a finite float (None for empty text)."""
    if isinstance(v, str):
        if not re.search(NUMBER_PATTERN, v):
            raise Invalid("wrong_type", f"expected {what}, got the text {v[:40]!r}")
        if v in ("", "\n"):  # empty ("$" matches before a final newline, as in the schema)
            return None
        v = float(v)
    elif isinstance(v, bool | np.bool_) or not isinstance(
        v,
        int | float | np.integer | np.floating | Decimal,  # (Decimal: a Parquet decimal)
    ):
        raise Invalid("wrong_type", f"expected {what}, got {type(v).__name__}")
    try:
        fv = float(v)
    except OverflowError:  # an integer beyond any float: as far out as a float goes
        fv = FLOAT_MAX if v > 0 else -FLOAT_MAX
    except ValueError:  # Decimal's signalling NaN
        raise Invalid("not_finite", "must be a finite number") from None
    if not math.isfinite(fv):
        raise Invalid("not_finite", "must be a finite number")
    return fv


def parse(kind: str, v: Any, max_len: int | None = None) -> Any:
    """The canonical value of ``v`` in a column of ``kind``: a float (numeric), a bool (boolean;
    a float for another number), a str (categorical) or None (missing); raises
    :class:`Invalid`."""
    if v is None:
        return None
    if kind == "numeric":
        return _number(v, "a number")
    if kind == "boolean":
        if isinstance(v, bool | np.bool_):
            return bool(v)
        if isinstance(v, str) and (v in TRUE_WORDS or v in FALSE_WORDS):
            return v in TRUE_WORDS
        x = _number(v, "true or false")
        return x if x is None or x not in (0.0, 1.0) else x == 1.0  # 7: kept, found unusual
    if isinstance(v, str):
        if max_len is not None and len(v) > max_len:
            raise Invalid("too_long", f"longer than {max_len} characters")
        return v
    return _category_number(v)


def _category_number(v: Any) -> str:
    """A number (or boolean) in a categorical column: its text, as training reads a cell."""
    if isinstance(v, bool | np.bool_):
        return str(bool(v))  # "True", "False"
    if isinstance(v, Decimal):  # a Parquet decimal: as the float it stands for
        v = _number(v, "a number")
    if isinstance(v, float):  # (numpy floats are floats)
        if not math.isfinite(v):
            raise Invalid("not_finite", "must be a finite number or a string")
        return str(int(v)) if v.is_integer() else str(float(v))
    if isinstance(v, int | np.integer):
        if abs(int(v)) > FLOAT_MAX:  # as far out as a float goes, as in numeric columns
            return str(FLOAT_MAX if v > 0 else -FLOAT_MAX)
        return str(int(v))
    raise Invalid("wrong_type", f"expected a string, got {type(v).__name__}")


def json_loads(data: bytes | memoryview) -> Any:
    """JSON as every entry point reads it: by orjson, else (what orjson refuses: the
    ``NaN``/``Infinity`` tokens, a number beyond a double, an integer of thousands of digits)
    by the standard library, so that such a value reaches :func:`parse` (a number is scored and
    flagged, however large; NaN and infinity are refused per field), not taken for invalid
    JSON. A lone UTF-16 surrogate is invalid JSON: no string holding one can
    be encoded again (in a reply, a log line, an output file). Raises ValueError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if "surrogate" in str(e):
            raise
        try:
            return json.loads(bytes(data), parse_int=_json_int, parse_float=_json_float)
        except (ValueError, RecursionError):
            raise e from None


def _json_float(text: str) -> float:
    """A JSON number with a fraction or an exponent; beyond a double (``1e400``), as far out
    as a double goes: a number all the same, to be scored and flagged (the ``Infinity`` token
    is no number: it stays infinite, and is refused)."""
    f = float(text)
    return f if math.isfinite(f) else math.copysign(FLOAT_MAX, f)


def _json_int(text: str) -> int | float:
    """A JSON integer; past Python's limit on digits (4,300), as :func:`_json_float`."""
    return int(text) if len(text) < 4000 else _json_float(text)


def is_boolean_value(v: Any) -> bool:
    """True for what makes a column boolean when types are inferred: true/false and the words."""
    if isinstance(v, bool | np.bool_):
        return True
    return isinstance(v, str) and (v in TRUE_WORDS or v in FALSE_WORDS)


def far_range(f: NumericFeature) -> tuple[float, float]:
    """Values outside this are *far* outside the training range: beyond the training minimum
    or maximum by more than the range's width (or beyond what float32 can hold)."""
    width = f.max - f.min
    return max(f.min - width, -FLOAT32_MAX), min(f.max + width, FLOAT32_MAX)


def why(f: AnyFeature, kind: str) -> str:
    """Why a value of ``f`` is unusual, for ``unusual_values``."""
    if kind == "out_of_range" and isinstance(f, NumericFeature):
        return f"{WHY[kind]} ({f.min:g} to {f.max:g})"
    return WHY[kind]


@dataclass
class Found:
    """Unusual values of a batch: (feature name, kind, rows) and the rows to flag."""

    items: list[tuple[str, str, npt.NDArray[np.bool_]]]
    flag: npt.NDArray[np.bool_] | None  # rows holding a value normal data never shows


class Checker:
    """Finds the unusual values among a batch's model inputs (built once per feature schema)."""

    def __init__(self, features: Sequence[AnyFeature]) -> None:
        num = [f for f in features if not isinstance(f, CategoricalFeature)]
        self.num_names = [f.name for f in sorted(num, key=lambda f: f.column)]
        ranges = [
            far_range(f) if isinstance(f, NumericFeature) else (0.0, 1.0)
            for f in sorted(num, key=lambda f: f.column)
        ]
        self.lo = np.array([r[0] for r in ranges], dtype=np.float32)
        self.hi = np.array([r[1] for r in ranges], dtype=np.float32)
        self.required = np.array([not f.nullable for f in sorted(num, key=lambda f: f.column)])
        self.bools = np.array(
            sorted(f.column for f in num if isinstance(f, BooleanFeature)), dtype=np.intp
        )
        cats = sorted(
            (f for f in features if isinstance(f, CategoricalFeature)), key=lambda f: f.column
        )
        self.cat_names = [f.name for f in cats]
        self.cat_required = np.array([not f.nullable for f in cats])
        self.cat_stable = [f.unseen_rate <= STABLE_UNSEEN_RATE for f in cats]
        # for the quick tests: column indexes, None when there are none
        self.required_idx = np.flatnonzero(self.required) if self.required.any() else None
        self.bool_idx = self.bools if len(self.bools) else None
        self.cat_required_idx = (
            np.flatnonzero(self.cat_required) if self.cat_required.any() else None
        )

    def __call__(self, x_num: np.ndarray | None, x_cat: np.ndarray | None) -> Found | None:
        """The unusual values (None if there are none: the common case, answered in a few array
        operations). Boolean entries other than 0/1 are set to NaN in ``x_num`` (the model
        cannot represent them: it sees them as missing)."""
        found: list[tuple[str, str, npt.NDArray[np.bool_]]] = []
        if x_num is not None and x_num.shape[1] and self._numbers_suspect(x_num):
            found += self._numbers(x_num)
        if x_cat is not None and x_cat.shape[1] and self._categories_suspect(x_cat):
            found += self._categories(x_cat)
        if not found:
            return None
        flags = [
            rows
            for name, kind, rows in found
            if kind != "unseen_category" or self.cat_stable[self.cat_names.index(name)]
        ]
        return Found(found, np.logical_or.reduce(flags) if flags else None)

    def _numbers_suspect(self, x: np.ndarray) -> bool:
        """Quick test: might ``x`` hold an unusual value? (NaN compares False.)"""
        if ((x < self.lo) | (x > self.hi)).any():
            return True
        if self.required_idx is not None and np.isnan(x[:, self.required_idx]).any():
            return True
        return self.bool_idx is not None and bool((x[:, self.bool_idx] % 1 > 0).any())

    def _categories_suspect(self, x: np.ndarray) -> bool:
        if (x == UNKNOWN_INDEX).any():
            return True
        return self.cat_required_idx is not None and bool(
            (x[:, self.cat_required_idx] == MISSING_INDEX).any()
        )

    def _numbers(self, x_num: np.ndarray) -> list[tuple[str, str, npt.NDArray[np.bool_]]]:
        found = []
        missing = np.isnan(x_num) & self.required
        beyond = (x_num < self.lo) | (x_num > self.hi)
        is_bool = np.zeros(x_num.shape[1], dtype=bool)
        is_bool[self.bools] = True
        b = x_num[:, is_bool]
        beyond[:, is_bool] = (b != 0) & (b != 1) & ~np.isnan(b)
        for j, name in enumerate(self.num_names):
            out_kind = "not_boolean" if is_bool[j] else "out_of_range"
            for kind, mask in (("missing", missing[:, j]), (out_kind, beyond[:, j])):
                if mask.any():
                    found.append((name, kind, mask))
        x_num[:, is_bool] = np.where(beyond[:, is_bool], np.nan, b)
        return found

    def _categories(self, x_cat: np.ndarray) -> list[tuple[str, str, npt.NDArray[np.bool_]]]:
        found = []
        unseen = x_cat == UNKNOWN_INDEX
        missing = (x_cat == MISSING_INDEX) & self.cat_required
        for j, name in enumerate(self.cat_names):
            for kind, mask in (("unseen_category", unseen[:, j]), ("missing", missing[:, j])):
                if mask.any():
                    found.append((name, kind, mask))
        return found


def never_normal(scores: np.ndarray, found: Found | None, threshold: float) -> np.ndarray:
    """Raise (in place) the score of every row holding a value normal data never shows to just
    above the threshold: such a record is flagged, whatever the model made of the value."""
    if found is not None and found.flag is not None:
        rows = found.flag
        scores[rows] = np.maximum(scores[rows], np.nextafter(threshold, np.inf))
    return scores
