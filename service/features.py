"""Turn columns of values into the model's input tensors, following a bundle's feature schema.

Training and the service both call :func:`encode_columns`, so a value is mapped to the same
input everywhere. Values are expected to be already validated: numbers (or None/NaN for
missing), booleans (True/False/0/1, None/NaN for missing), category strings (None = missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.bundle import (
    MISSING_INDEX,
    UNKNOWN_INDEX,
    BooleanFeature,
    CategoricalFeature,
    Manifest,
    NumericFeature,
    input_of,
)
from service.values import FLOAT32_MAX, Checker, Found


@dataclass
class Encoded:
    inputs: dict[str, np.ndarray]
    n_rows: int
    # feature name -> boolean mask of rows whose category was never seen in training
    unknown: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    unusual: Found | None = None  # values the model never saw (see service/values.py)


def _as_float(values: Sequence[Any] | np.ndarray) -> npt.NDArray[np.float32]:
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr], dtype=np.float64)
    return np.asarray(arr, dtype=np.float32)


class Encoder:
    """Encodes columns for one feature schema; the category lookups are built once."""

    def __init__(
        self, features: Sequence[NumericFeature | BooleanFeature | CategoricalFeature]
    ) -> None:
        self.features = list(features)
        self.n_num = sum(1 for f in features if input_of(f) == "x_num")
        self.n_cat = len(self.features) - self.n_num
        # reserved tokens are not user values: "<missing>" sent as a string is unknown
        self.index = {
            f.name: {c: i for i, c in enumerate(f.categories) if i > MISSING_INDEX}
            for f in self.features
            if isinstance(f, CategoricalFeature)
        }
        self.check = Checker(self.features)

    def __call__(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> Encoded:
        """Encode ``columns`` (feature name -> values, all of one length) for the ONNX model."""
        with np.errstate(over="ignore"):  # a number beyond float32 is inf, then found unusual
            return self._encode(columns)

    def _encode(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> Encoded:
        n = len(next(iter(columns.values()))) if columns else 0
        x_num = np.full((n, self.n_num), np.nan, dtype=np.float32)
        x_cat = np.full((n, self.n_cat), MISSING_INDEX, dtype=np.int64)
        unknown: dict[str, npt.NDArray[np.bool_]] = {}
        for f in self.features:
            values = columns[f.name]
            if not isinstance(f, CategoricalFeature):
                x_num[:, f.column] = _as_float(values)
                continue
            index = self.index[f.name]
            codes = np.fromiter(
                (
                    MISSING_INDEX
                    if v is None or (isinstance(v, float) and v != v)
                    else index.get(str(v), UNKNOWN_INDEX)
                    for v in values
                ),
                dtype=np.int64,
                count=n,
            )
            x_cat[:, f.column] = codes
            unk = codes == UNKNOWN_INDEX
            if unk.any():
                unknown[f.name] = unk
        unusual = self.check(x_num, x_cat)
        if unusual is not None and self.n_num:
            np.clip(x_num, -FLOAT32_MAX, FLOAT32_MAX, out=x_num)
        inputs: dict[str, np.ndarray] = {}
        if self.n_num:
            inputs["x_num"] = x_num
        if self.n_cat:
            inputs["x_cat"] = x_cat
        return Encoded(inputs=inputs, n_rows=n, unknown=unknown, unusual=unusual)


def encode_columns(
    features: Sequence[NumericFeature | BooleanFeature | CategoricalFeature],
    columns: Mapping[str, Sequence[Any] | np.ndarray],
) -> Encoded:
    """One-off encoding (an :class:`Encoder` saves rebuilding the lookups on every call)."""
    return Encoder(features)(columns)


class Percentiles:
    """Percentile (0-100) of scores among the normal calibration scores, per score type."""

    def __init__(self, manifest: Manifest) -> None:
        self.tables = {}
        for st, d in manifest.distributions.items():
            q = np.asarray(d.quantiles, dtype=np.float64)
            p = np.asarray(d.probs, dtype=np.float64)
            # quantiles may repeat (ties); interp needs increasing x: keep each value's last prob
            q_u, idx = np.unique(q[::-1], return_index=True)
            self.tables[st] = (q_u, p[::-1][idx])

    def __call__(self, score_type: str, scores: np.ndarray) -> np.ndarray:
        q, p = self.tables[score_type]  # type: ignore[index]
        out = np.interp(np.asarray(scores, dtype=np.float64), q, p, left=0.0, right=1.0)
        return np.asarray(out * 100.0)
