"""What a value of each kind of feature may be, what it means to the model, and when it is
unusual: the one set of rules for training, ``/v1/score``, V2 infer and ``vae-anomaly score``.

:func:`parse` reads one value (JSON, or a cell of a table) into its canonical form, or raises
:class:`Invalid` when it cannot be a value of that kind of column at all:

- numeric: a number, or text that is a plain decimal number (``"42.5"``, ``"-1e3"``; a CSV cell
  is text). Not ``true``/``false``, not ``"100,000.00"`` or ``"$100"``, not NaN or infinity.
- boolean: ``true``/``false``; the words true/false, t/f, yes/no, y/n, on/off (lower, Title or
  UPPER case); a number (1 and 0 mean true and false; any other number is unusual).
- categorical: text, or a number (written as its decimal text: ``7`` and ``7.0`` are ``"7"``).

``None``, NaN and (for numbers and booleans) empty text are *missing*, never invalid. What is
unusual — a value the model has never seen — is decided for a whole batch at once by
:class:`Checker` (see :data:`WHY`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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
NUMBER_PATTERN = r"^[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,2})?$"
FLOAT32_MAX = float(np.finfo(np.float32).max)
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
        if not v:
            return None
        if not re.search(NUMBER_PATTERN, v):
            raise Invalid("wrong_type", f"expected {what}, got the text {v[:40]!r}")
        v = float(v)
    elif isinstance(v, bool | np.bool_) or not isinstance(
        v, int | float | np.integer | np.floating
    ):
        raise Invalid("wrong_type", f"expected {what}, got {type(v).__name__}")
    try:
        fv = float(v)
    except OverflowError:
        raise Invalid("not_finite", "too large for a number") from None
    if not math.isfinite(fv):
        raise Invalid("not_finite", "must be a finite number")
    return fv


def parse(kind: str, v: Any, max_len: int | None = None) -> Any:
    """The canonical value of ``v`` in a column of ``kind``: a float (numeric, boolean), a str
    (categorical) or None (missing); raises :class:`Invalid`."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if kind == "numeric":
        return _number(v, "a number")
    if kind == "boolean":
        if isinstance(v, bool | np.bool_):
            return 1.0 if v else 0.0
        if isinstance(v, str) and (v in TRUE_WORDS or v in FALSE_WORDS):
            return 1.0 if v in TRUE_WORDS else 0.0
        return _number(v, "true or false")
    text = _category_text(v)
    if max_len is not None and len(text) > max_len:
        raise Invalid("too_long", f"longer than {max_len} characters")
    return text


def _category_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool | np.bool_):  # as training reads a table cell: "True", "False"
        return str(bool(v))
    if isinstance(v, int | np.integer):
        if int(v).bit_length() > 1000:  # str() of a huge int is slow, then refused
            raise Invalid("too_long", "an integer of over 300 digits")
        return str(int(v))
    if isinstance(v, float):  # numpy floats are floats too
        if not math.isfinite(v):
            raise Invalid("not_finite", "must be a finite number or a string")
        return str(int(v)) if v.is_integer() else str(float(v))
    raise Invalid("wrong_type", f"expected a string, got {type(v).__name__}")


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

    def __call__(self, x_num: np.ndarray | None, x_cat: np.ndarray | None) -> Found | None:
        """The unusual values (None if there are none: the common case, checked in a few array
        operations). Boolean entries other than 0/1 are set to NaN in ``x_num`` (the model
        cannot represent them: it sees them as missing)."""
        found: list[tuple[str, str, npt.NDArray[np.bool_]]] = []
        flags: list[npt.NDArray[np.bool_]] = []
        if x_num is not None and x_num.shape[1]:
            missing = np.isnan(x_num) & self.required
            beyond = (x_num < self.lo) | (x_num > self.hi)
            if len(self.bools):
                b = x_num[:, self.bools]
                beyond[:, self.bools] = (b != 0) & (b != 1) & ~np.isnan(b)
            if missing.any() or beyond.any():
                for j, name in enumerate(self.num_names):
                    for kind, mask in (("missing", missing[:, j]), ("out_of_range", beyond[:, j])):
                        if mask.any():
                            is_bool = kind == "out_of_range" and j in self.bools
                            found.append((name, "not_boolean" if is_bool else kind, mask))
                            flags.append(mask)
                if len(self.bools):
                    b = x_num[:, self.bools]
                    x_num[:, self.bools] = np.where(beyond[:, self.bools], np.nan, b)
        if x_cat is not None and x_cat.shape[1]:
            unseen = x_cat == UNKNOWN_INDEX
            missing = (x_cat == MISSING_INDEX) & self.cat_required
            if unseen.any() or missing.any():
                for j, name in enumerate(self.cat_names):
                    if unseen[:, j].any():
                        found.append((name, "unseen_category", unseen[:, j]))
                        if self.cat_stable[j]:
                            flags.append(unseen[:, j])
                    if missing[:, j].any():
                        found.append((name, "missing", missing[:, j]))
                        flags.append(missing[:, j])
        if not found:
            return None
        return Found(found, np.logical_or.reduce(flags) if flags else None)


def never_normal(scores: np.ndarray, found: Found | None, threshold: float) -> np.ndarray:
    """Raise (in place) the score of every row holding a value normal data never shows to just
    above the threshold: such a record is flagged, whatever the model made of the value."""
    if found is not None and found.flag is not None:
        rows = found.flag
        scores[rows] = np.maximum(scores[rows], np.nextafter(threshold, np.inf))
    return scores
