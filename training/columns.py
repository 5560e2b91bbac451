"""Which columns of the training data the model uses, and how.

Date-time columns (ISO 8601 strings or a datetime dtype are recognised; epoch numbers when the
config says so) become time features (service/timefeatures.py) or, with ``transform = "drop"``,
are left out; id-like columns are left out with a warning (and kept as id columns for bulk
scoring); every column's fate is reported (manifest ``columns``, the summary, report.html).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from service.bundle import UNKNOWN_TOKEN, ColumnUse, DateTimeColumn, NumericFeature
from service.timefeatures import DERIVED, derive, feature_name
from training.config import ColumnConfig, TrainConfig

if TYPE_CHECKING:
    from training.data import Feature

ISO_START = re.compile(r"\s*\d{4}-\d{2}-\d{2}")  # a date first: 2024-05-01, 2024-05-01T09:30Z
MIN_ID_RECORDS = 50  # fewer present values tell nothing about uniqueness
TIME_FEATURE = ColumnConfig(type="numeric", transform="none")  # sin/cos need no log


def _texts(dtype: Any) -> bool:
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


def _looks_datetime(s: pd.Series) -> bool:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return True
    if not _texts(s.dtype):
        return False
    present = s.dropna().tolist()
    probe = DateTimeColumn(
        name="probe", unit="iso", timezone="local", nullable=True, derived=["hour_sin"]
    )
    for chunk in (present[:100], present):  # most columns fail on their first values
        if not chunk or not all(isinstance(v, str) and ISO_START.match(v) for v in chunk):
            return False
        if derive(chunk, probe)[1]:
            return False
    return True


def datetime_of(s: pd.Series, name: str, cc: ColumnConfig | None) -> DateTimeColumn | None:
    """The column as a date-time column, if the config says so or its values are date-times
    (an explicit other type in the config wins)."""
    configured = cc is not None and cc.datetime
    if not configured and ((cc is not None and cc.type is not None) or not _looks_datetime(s)):
        return None
    return DateTimeColumn(
        name=name,
        unit=cc.unit if cc and cc.unit else "iso",
        timezone=cc.timezone if cc and cc.timezone else "local",
        nullable=bool(s.isna().any()),
        derived=list(DERIVED),
    )


def id_reason(s: pd.Series, cfg: TrainConfig) -> str | None:
    """Why the column looks like an id (None if it does not): integers or strings nearly
    unique per record (integers only when in sequence: a count or an amount may be unique
    too), or strings with too many values to be a category. Floats are measurements."""
    present = s.dropna()
    n = len(present)
    dtype = present.dtype
    if n < MIN_ID_RECORDS or pd.api.types.is_bool_dtype(dtype):
        return None
    if pd.api.types.is_integer_dtype(dtype):
        distinct = int(present.nunique())
        span = int(present.max()) - int(present.min()) + 1
        ordered = present.is_monotonic_increasing or present.is_monotonic_decreasing
        if distinct >= cfg.id_distinct_share * n and (ordered or distinct >= 0.5 * span):
            return f"{distinct} distinct integers in {n} records, in sequence"
        return None
    if not _texts(dtype):
        return None
    counts = present.astype(str).value_counts()
    if len(counts) >= cfg.id_distinct_share * n:
        return f"{len(counts)} distinct values in {n} records"
    kept = counts[counts >= cfg.min_category_count].iloc[: cfg.max_categories]
    unknown = 1 - kept.sum() / n
    if len(counts) > cfg.max_categories and unknown > cfg.id_unknown_share:
        return (
            f"{len(counts)} distinct values, over the {cfg.max_categories}-category cap: "
            f"{unknown:.0%} of the records would be {UNKNOWN_TOKEN}"
        )
    return None


@dataclass
class Plan:
    """The model's columns: date-times replaced by their time features, ids and dropped
    date-times taken out."""

    normal: pd.DataFrame
    anomalous: pd.DataFrame
    overrides: dict[str, ColumnConfig] = field(default_factory=dict)  # time features
    datetimes: list[DateTimeColumn] = field(default_factory=list)
    left_out: dict[str, ColumnUse] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _expand(frame: pd.DataFrame, col: DateTimeColumn) -> pd.DataFrame:
    from training.data import DataError  # data.py imports this module

    derived, bad = derive(frame[col.name].tolist(), col)
    if bad:
        i, e = bad[0]
        raise DataError(
            f"column {col.name!r} is a date-time ({col.unit}) but holds "
            f"{frame[col.name].iloc[i]!r} (row {i}): {e.message}"
        )
    clash = [k for k in derived if k in frame.columns]
    if clash:
        raise DataError(f"column {col.name!r}: its time features clash with columns {clash}")
    at = list(frame.columns).index(col.name)
    frame = frame.drop(columns=col.name)
    for k, v in derived.items():
        frame.insert(at, k, v)
        at += 1
    return frame


def plan(normal: pd.DataFrame, anomalous: pd.DataFrame, cfg: TrainConfig) -> Plan:
    """Decide the fate of each (not excluded) column; see the module's docstring."""
    p = Plan(normal, anomalous)
    for name in list(normal.columns):
        cc = cfg.columns.get(name)
        col = datetime_of(normal[name], name, cc)
        if col is not None and cc is not None and cc.transform == "drop":
            p.left_out[name] = ColumnUse(
                name=name, type="datetime", used=False, transform="drop",
                reason='transform = "drop" in the config',
            )  # fmt: skip
        elif col is not None:
            p.normal, p.anomalous = _expand(p.normal, col), _expand(p.anomalous, col)
            p.datetimes.append(col)
            p.overrides.update({feature_name(name, d): TIME_FEATURE for d in col.derived})
            continue
        elif (cc is None or cc.type is None) and (why := id_reason(normal[name], cfg)):
            p.left_out[name] = ColumnUse(name=name, type="id", used=False, reason=f"id-like: {why}")
            hint = (
                f'[columns.{name}] type = "numeric" (if it is a time: type = "datetime", '
                'unit = "epoch_s" or "epoch_ms")'
                if pd.api.types.is_integer_dtype(normal[name].dtype)
                else f'[columns.{name}] type = "categorical"'
            )
            p.notes.append(
                f"column {name!r} looks like an id ({why}); left out of the model and kept "
                f"as an id column for bulk scoring (to model it anyway: {hint})"
            )
        else:
            continue
        p.normal = p.normal.drop(columns=name)
        p.anomalous = p.anomalous.drop(columns=name)
    return p


def _use(f: Feature) -> ColumnUse:
    if isinstance(f, NumericFeature):
        how = "log, then robust scaling" if f.transform == "log" else "robust scaling"
    elif f.kind == "categorical":
        how = f"{len(f.categories) - 2} categories, others {UNKNOWN_TOKEN}"
    else:
        how = "0/1"
    note = "missing values modelled" if f.nullable else ""
    return ColumnUse(name=f.name, type=f.kind, used=True, transform=how, reason=note)


def finish(
    p: Plan,
    columns: list[str],
    features: list[Feature],
    dropped: dict[str, tuple[str, str]],
    cfg: TrainConfig,
) -> tuple[list[DateTimeColumn], list[ColumnUse]]:
    """The date-time columns as the model uses them (only their kept time features) and the
    report of every column of the data, in order. ``dropped``: column -> (type, reason)."""
    used = {f.name: f for f in features}
    datetimes, report = [], {}
    for col in p.datetimes:
        kept = [d for d in col.derived if feature_name(col.name, d) in used]
        how = f"cyclical ({col.unit}, {col.timezone} time): " + ", ".join(kept or col.derived)
        if kept:
            datetimes.append(col.model_copy(update={"derived": kept}))
        constant = [d for d in col.derived if d not in kept]
        reason = f"constant, dropped: {', '.join(constant)}" if constant else ""
        report[col.name] = ColumnUse(
            name=col.name, type="datetime", used=bool(kept), transform=how, reason=reason
        )
    for c in columns:
        if c in report:
            continue
        if c in p.left_out:
            report[c] = p.left_out[c]
        elif c in used:
            report[c] = _use(used[c])
        elif c in dropped:
            report[c] = ColumnUse(name=c, type=dropped[c][0], used=False, reason=dropped[c][1])
        elif c == cfg.label_column:
            report[c] = ColumnUse(name=c, type="label", used=False, reason="the label column")
        elif c == cfg.color_column:
            report[c] = ColumnUse(name=c, type="label", used=False, reason="colors the map only")
        else:
            report[c] = ColumnUse(
                name=c, type="-", used=False, reason="excluded (exclude, --exclude)"
            )
    return datetimes, [report[c] for c in columns]
