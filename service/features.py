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


@dataclass
class Encoded:
    inputs: dict[str, np.ndarray]
    n_rows: int
    # feature name -> boolean mask of rows whose category was never seen in training
    unknown: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)


def _as_float(values: Sequence[Any] | np.ndarray) -> npt.NDArray[np.float32]:
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr], dtype=np.float64)
    return np.asarray(arr, dtype=np.float32)


def encode_columns(
    features: Sequence[NumericFeature | BooleanFeature | CategoricalFeature],
    columns: Mapping[str, Sequence[Any] | np.ndarray],
) -> Encoded:
    """Encode ``columns`` (feature name -> values, all of one length) for the ONNX model."""
    n = len(next(iter(columns.values()))) if columns else 0
    n_num = sum(1 for f in features if input_of(f) == "x_num")
    n_cat = len(features) - n_num
    x_num = np.full((n, n_num), np.nan, dtype=np.float32)
    x_cat = np.full((n, n_cat), MISSING_INDEX, dtype=np.int64)
    unknown: dict[str, npt.NDArray[np.bool_]] = {}
    for f in features:
        values = columns[f.name]
        if isinstance(f, NumericFeature | BooleanFeature):
            x_num[:, f.column] = _as_float(values)
        elif isinstance(f, CategoricalFeature):
            index = {c: i for i, c in enumerate(f.categories)}
            # reserved tokens are not user values: "<missing>" sent as a string is unknown
            index.pop(f.categories[UNKNOWN_INDEX])
            index.pop(f.categories[MISSING_INDEX])
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
    inputs: dict[str, np.ndarray] = {}
    if n_num:
        inputs["x_num"] = x_num
    if n_cat:
        inputs["x_cat"] = x_cat
    return Encoded(inputs=inputs, n_rows=n, unknown=unknown)


def percentile(manifest: Manifest, score_type: str, scores: np.ndarray) -> np.ndarray:
    """Percentile (0-100) of each score among the normal calibration scores."""
    d = manifest.distributions[score_type]  # type: ignore[index]
    q = np.asarray(d.quantiles, dtype=np.float64)
    p = np.asarray(d.probs, dtype=np.float64)
    # quantiles may repeat (ties); interp needs increasing x, so keep the last prob of each value
    q_u, idx = np.unique(q[::-1], return_index=True)
    p_u = p[::-1][idx]
    out = np.interp(np.asarray(scores, dtype=np.float64), q_u, p_u, left=0.0, right=1.0)
    return np.asarray(out * 100.0)
