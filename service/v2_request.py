"""A V2 (Open Inference Protocol) inference request, validated into columns.

One input tensor per feature becomes one column of values by the rules of service/values.py
(whatever the tensor's datatype); a date-time field becomes its time features. The routes that
take requests are in :mod:`service.v2`; binary tensors are decoded by :mod:`service.v2_binary`.
"""

from __future__ import annotations

import math
from itertools import repeat
from typing import Any, Literal, get_args

import numpy as np

from service import timefeatures, v2_binary, values
from service.bundle import (
    BooleanFeature,
    CategoricalFeature,
    DateTimeColumn,
    Manifest,
    NumericFeature,
)
from service.errors import BadRequest
from service.settings import Settings

Datatype = Literal[
    "BOOL", "BYTES", "FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
    "UINT8", "UINT16", "UINT32", "UINT64",
]  # fmt: skip
# the values each numeric datatype can hold: (least, greatest, integers only)
RANGES: dict[str, tuple[float, float, bool]] = {
    **{f"INT{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1, True) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (0, 2**b - 1, True) for b in (8, 16, 32, 64)},
    "FP16": (-65504.0, 65504.0, False),
    "FP32": (-3.4028234663852886e38, 3.4028234663852886e38, False),
}
DATATYPES = frozenset(get_args(Datatype))
NUMERIC_TYPES = DATATYPES - {"BOOL", "BYTES"}
OUTPUTS = {"score": "FP64", "is_anomaly": "BOOL", "percentile": "FP64"}
Column = list[Any] | np.ndarray  # a feature's values: a list, or an array (binary tensors)


def feature_datatype(
    f: NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn,
) -> str:
    if isinstance(f, DateTimeColumn):
        return "BYTES" if f.unit == "iso" else "FP64"
    if isinstance(f, NumericFeature):
        return "FP64"
    return "BOOL" if isinstance(f, BooleanFeature) else "BYTES"


def _datatypes(
    f: NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn,
) -> set[str]:
    """The datatypes an input may have."""
    return set(NUMERIC_TYPES) if feature_datatype(f) == "FP64" else {feature_datatype(f)}


def client_inputs(
    m: Manifest,
) -> list[NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn]:
    """What clients send: the features, a date-time field instead of its time features."""
    derived = timefeatures.derived_names(m)
    return [*(f for f in m.features if f.name not in derived), *m.datetime_columns]


Feature = NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn


class _Plan:
    """What the parser needs of one model, worked out once (not per request): the inputs
    by name, the names a request may carry, every column a request ends up with."""

    def __init__(self, m: Manifest) -> None:
        self.feats: dict[str, Feature] = {f.name: f for f in client_inputs(m)}
        self.known = frozenset(self.feats) | frozenset(m.ignored_columns)
        self.columns = [*self.feats, *timefeatures.derived_names(m)]
        self.score_types = frozenset(m.score_types)
        # the inputs binary tensors may fill on the fast path: the features sent as they are
        self.kinds = {k: f.kind for k, f in self.feats.items() if not isinstance(f, DateTimeColumn)}
        self.required = {k for k, f in self.feats.items() if not f.nullable}


_plans: dict[tuple[str, str], _Plan] = {}


def _plan(m: Manifest) -> _Plan:
    key = (m.name, m.version)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 8:  # models come and go (reloads): keep a few
            _plans.clear()
        plan = _plans[key] = _Plan(m)
    return plan


def _flatten(data: Any, depth: int) -> list[Any]:
    """Tensor data, flat or nested as its shape, as one flat list; at most ``depth`` levels."""
    if not isinstance(data, list):
        raise BadRequest("tensor data must be a JSON array")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= depth:
                    raise BadRequest(f"tensor data nests deeper than its shape ({depth} levels)")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _fits(v: float, least: float, greatest: float, integral: bool) -> bool:
    return least <= v <= greatest and (not integral or isinstance(v, int) or v.is_integer())


def _of_datatype(v: Any, dt: str) -> bool:
    """Whether a JSON value is of the tensor's datatype (null, missing, is of any)."""
    if v is None:
        return True
    if dt == "BOOL":
        return isinstance(v, bool)
    if dt == "BYTES":
        return isinstance(v, str)
    if dt.startswith(("INT", "UINT")):  # 12.0 is the integer 12 in JSON
        return not isinstance(v, bool) and (
            isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        )
    return isinstance(v, int | float) and not isinstance(v, bool)


def _column(
    f: NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn,
    t: dict[str, Any],
    max_len: int,
) -> list[Any]:
    """A feature's tensor as values, by the rules of service/values.py (whatever the datatype:
    ``BYTES`` ``["yes"]`` for a boolean, ``INT64`` for a categorical are values too)."""
    name, dt, data = f.name, t.get("datatype"), t.get("data")
    if isinstance(data, np.ndarray):  # a binary tensor: its values as a JSON one's
        data = data.tolist()
    if not isinstance(dt, str) or dt not in DATATYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {dt!r}")
    if isinstance(f, DateTimeColumn) and dt not in _datatypes(f):
        allowed = " or ".join(sorted(_datatypes(f)))
        raise BadRequest(f"input {name!r}: a date-time field is {allowed}, not {dt}")
    shape = t.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise BadRequest(f"input {name!r}: shape must be [N] or [N, 1], got {shape!r}")
    data = _flatten(data, len(shape))
    if len(data) != shape[0]:
        raise BadRequest(
            f"input {name!r}: shape {shape} holds {shape[0]} values, data has {len(data)}"
        )
    out: list[Any] = []
    for i, v in enumerate(data):
        if not _of_datatype(v, dt):
            raise BadRequest(f"input {name!r}[{i}]: {type(v).__name__} in a {dt} tensor")
        if dt in RANGES and v is not None and not _fits(v, *RANGES[dt]):
            raise BadRequest(f"input {name!r}[{i}]: {v!r:.40} is not a {dt} value")
        if isinstance(f, DateTimeColumn):
            out.append(v)  # checked by timefeatures.derive_column
            continue
        try:
            out.append(values.parse(f.kind, v, max_len))
        except values.Invalid as e:
            raise BadRequest(f"input {name!r}[{i}]: {e.message}") from None
    return out


FAST_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    # feature kind -> datatype -> the exact Python types its values may have on the fast path
    "numeric": {"FP64": (float, int), "FP32": (float, int), "INT64": (int,), "INT32": (int,)},
    "boolean": {"BOOL": (bool,)},
    "categorical": {"BYTES": (str,)},
}
LIMITS = {"FP32": 3.4028234663852886e38, "INT64": 2**63 - 1, "INT32": 2**31 - 1}


def _fast_column(
    f: NumericFeature | BooleanFeature | CategoricalFeature, t: dict[str, Any], max_len: int
) -> Column | None:
    """The values of a tensor that is plainly valid (shape ``[N]``, a flat list of N values of
    the feature's usual datatype, exact Python types, no nulls, numbers finite and within the
    datatype's range, strings within the limit); None if it needs :func:`_column`'s closer
    look. A subset of what ``_column`` accepts, with the same values. (Written for speed: this
    runs for every tensor the service scores.)"""
    data, shape = t.get("data"), t.get("shape")
    if type(data) is np.ndarray:
        return _array_column(f, t["datatype"], data, shape)
    dt = t.get("datatype")
    types = FAST_TYPES[f.kind].get(dt) if type(dt) is str else None
    if (
        types is None
        or type(data) is not list
        or type(shape) is not list
        or len(shape) != 1
        or type(shape[0]) is not int  # (1.0 and true equal 1, and are no dimension)
        or shape[0] != len(data)
        or not all([type(v) in types for v in data])
    ):
        return None
    if types[0] is str:
        return data if max(map(len, data), default=0) <= max_len else None
    if types[0] is bool:
        return data
    try:
        total = sum([abs(v) for v in data])
        if not (math.isfinite(total) and total <= LIMITS.get(t["datatype"], math.inf)):
            return None
    except OverflowError:  # an integer beyond any float
        return None
    return [float(v) for v in data]


def _array_column(
    f: NumericFeature | BooleanFeature | CategoricalFeature, dt: str, data: np.ndarray, shape: Any
) -> np.ndarray | None:
    """The values of a binary tensor that is plainly valid, array-wide: numbers (any numeric
    datatype, floats finite) for a numeric feature, as float64; BOOL for a boolean one. None if
    it needs :func:`_column`'s closer look (which gives the same values, or the error). A binary
    tensor's datatype, shape and length are already consistent (service/v2_binary.py)."""
    if not (
        type(shape) is list
        and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
        and shape[0] == len(data)
    ):
        return None
    if f.kind == "numeric" and dt in NUMERIC_TYPES:
        return data.astype(np.float64) if dt[0] != "F" or v2_binary.finite(data) else None
    return data if f.kind == "boolean" and dt == "BOOL" else None


Parsed = tuple[dict[str, Column], int, str | None, list[str], str | None, set[str]]


def parse(
    body: Any, m: Manifest, settings: Settings, tail: tuple[bytes, int] | None = None
) -> Parsed:
    """Validate an inference request: (columns, records, score type, output names, id, the
    outputs wanted as binary data). ``tail``: a binary request's body and where its tensors'
    bytes start (service/v2_binary.py)."""
    if not isinstance(body, dict):
        raise BadRequest("the inference request must be a JSON object")
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"'id' must be a string, got {type(rid).__name__}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(map(isinstance, inputs, repeat(dict))):
        raise BadRequest("'inputs' must be a list of tensor objects")
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    plan = _plan(m)
    score_type = params.get("score_type")
    # (a JSON value is checked for its type before it is looked up: a list or an object is
    # unhashable, and would be a 500)
    if score_type is not None and (
        not isinstance(score_type, str) or score_type not in plan.score_types
    ):
        raise BadRequest(f"parameter score_type must be one of {m.score_types}")
    columns: dict[str, Column] | None = None
    if tail is not None:
        max_len, most = settings.max_string_length, settings.max_records
        columns = v2_binary.fast_columns(inputs, *tail, plan.kinds, max_len, most)
        if columns is None or not columns.keys() >= plan.required:
            v2_binary.decode_inputs(inputs, *tail, most)
            columns = None
    if columns is None:
        columns = _columns(inputs, plan, settings)
    lengths = set(map(len, columns.values()))
    if len(lengths) > 1:
        raise BadRequest(f"inputs have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0 or n > settings.max_records:
        raise BadRequest(f"a request holds 1 to {settings.max_records} records, this one {n}")
    if len(columns) < len(plan.columns):
        for fname in plan.columns:
            columns.setdefault(fname, [None] * n)
    names = _output_names(body.get("outputs"))
    return columns, n, score_type, names, rid, v2_binary.binary_outputs(body, names)


def _columns(inputs: list[dict[str, Any]], plan: _Plan, settings: Settings) -> dict[str, Column]:
    """The columns of the inputs (JSON data, or binary decoded): by feature, validated."""
    by_name = _by_name(inputs)
    feats = plan.feats
    if settings.unknown_fields == "reject" and not by_name.keys() <= plan.known:
        unknown = sorted(by_name.keys() - plan.known)
        raise BadRequest(
            f"unknown input(s) {_listed(unknown)}; the model's inputs are {sorted(feats)}"
        )
    columns: dict[str, Column] = {}
    for fname, f in feats.items():
        if fname in by_name and isinstance(f, DateTimeColumn):
            columns[fname] = raw = _column(f, by_name[fname], settings.max_string_length)
            try:
                columns.update(timefeatures.derive_column(raw, f))
            except timefeatures.NotADateTime as e:
                raise BadRequest(e.message) from None
        elif fname in by_name and not isinstance(f, DateTimeColumn):
            t, max_len = by_name[fname], settings.max_string_length
            fast = _fast_column(f, t, max_len)
            columns[fname] = fast if fast is not None else _column(f, t, max_len)
        elif not f.nullable:
            raise BadRequest(f"input {fname!r} is required")
    return columns


def _by_name(inputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for t in inputs:
        tname = t.get("name")
        if not isinstance(tname, str):
            raise BadRequest("every input needs a string 'name'")
        if tname in by_name:
            raise BadRequest(f"input {tname!r} is given twice")
        by_name[tname] = t
    return by_name


def _output_names(wanted: Any) -> list[str]:
    """The outputs a request asks for (all when it names none)."""
    if wanted is None:
        return list(OUTPUTS)
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = [o.get("name") for o in wanted]
    bad = [o for o in names if not isinstance(o, str) or o not in OUTPUTS]
    if bad:
        raise BadRequest(f"unknown output(s) {_listed(bad)}; available: {list(OUTPUTS)}")
    return names


LISTED = 10  # names an error message lists, at most: a hostile request can hold millions


def _listed(items: list[Any]) -> str:
    """The first few of ``items`` for an error message (each cut short), and how many more."""
    shown = ", ".join(f"{v!r:.60}" for v in items[:LISTED])
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"[{shown}]{more}"
