"""Time features derived from a date-time field: one definition for training, the service and
bulk scoring, so a value gives the same features everywhere.

A value is an ISO 8601 string (unit ``iso``) or a number of seconds or milliseconds since
1970-01-01 UTC (``epoch_s``, ``epoch_ms``); a datetime object (a Parquet column read by pandas)
is taken as it is, whatever the unit. The time of day is the clock time as written — in a
value's own offset when it carries one, UTC when it does not (and for epoch numbers) — or, with
timezone ``utc``, converted to UTC first. Features are angles on a circle, so that 23:59 sits
next to 00:00 and Sunday next to Monday:

- ``hour_sin``, ``hour_cos``: the time of day (2π per 24 hours);
- ``dow_sin``, ``dow_cos``: the day of the week (2π per 7 days, Monday 00:00 = 0, continuous
  through each day).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from service.bundle import DateTimeColumn, Manifest, TimeFeature, time_feature_name

DERIVED: tuple[TimeFeature, ...] = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
MAX_LENGTH = 64  # longer than any ISO 8601 date-time
DAY = 86_400.0
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
ABSENT: Any = object()  # a field left out of a record (None is a field given as null)


class NotADateTime(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


feature_name = time_feature_name


def derived_names(m: Manifest) -> dict[str, str]:
    """Derived feature name -> the date-time field it comes from."""
    return {feature_name(c.name, d): c.name for c in m.datetime_columns for d in c.derived}


def is_missing(v: Any) -> bool:
    """None, a left-out field, NaN, or a missing timestamp (pandas' NaT: unequal to itself)."""
    return v is None or v is ABSENT or bool(v != v)


def clock(v: Any, col: DateTimeColumn) -> tuple[float, float]:
    """(seconds into the day, day of the week 0-6) of one present value; NotADateTime if it
    is not a date-time of the column's unit."""
    if isinstance(v, datetime):
        d = v
    elif col.unit == "iso":
        if not isinstance(v, str):
            raise NotADateTime("wrong_type", f"expected an ISO 8601 string, got {type(v).__name__}")
        if len(v) > MAX_LENGTH:
            raise NotADateTime("too_long", f"longer than {MAX_LENGTH} characters")
        try:
            d = datetime.fromisoformat(v.strip())
        except ValueError:
            raise NotADateTime("not_a_datetime", f"{v!r} is not an ISO 8601 date-time") from None
    else:
        if isinstance(v, bool) or not isinstance(v, int | float):
            what = "seconds" if col.unit == "epoch_s" else "milliseconds"
            raise NotADateTime("wrong_type", f"expected {what} since 1970, got {type(v).__name__}")
        try:
            secs = float(v) / (1000.0 if col.unit == "epoch_ms" else 1.0)
        except OverflowError:
            secs = math.inf
        if not math.isfinite(secs):
            raise NotADateTime("not_finite", "must be a finite number")
        days = math.floor(secs / DAY)
        return secs - days * DAY, float((days + EPOCH_WEEKDAY) % 7)
    secs = d.hour * 3600 + d.minute * 60 + d.second + d.microsecond / 1e6
    if col.timezone == "utc" and (offset := d.utcoffset()):
        # shifted by hand: ``d - offset`` overflows on the first and last days a datetime
        # holds (0001-01-01T00:30+01:00 is in year 0 in UTC), and the clock is all we need
        secs -= offset.total_seconds()
        days = math.floor(secs / DAY)
        return secs - days * DAY, float((d.weekday() + days) % 7)
    return secs, float(d.weekday())


def derive(
    values: Sequence[Any], col: DateTimeColumn
) -> tuple[dict[str, np.ndarray], list[tuple[int, NotADateTime]]]:
    """The column's derived features (feature name -> float64, NaN = missing or not a date-time)
    and the entries that are not date-times, by index."""
    n = len(values)
    seconds, weekday = np.full(n, np.nan), np.full(n, np.nan)
    bad: list[tuple[int, NotADateTime]] = []
    for i, v in enumerate(values):
        if is_missing(v):
            continue
        try:
            seconds[i], weekday[i] = clock(v, col)
        except NotADateTime as e:
            bad.append((i, e))
    day = 2 * math.pi * seconds / DAY
    week = 2 * math.pi * (weekday + seconds / DAY) / 7
    every = {
        "hour_sin": np.sin(day),
        "hour_cos": np.cos(day),
        "dow_sin": np.sin(week),
        "dow_cos": np.cos(week),
    }
    return {feature_name(col.name, d): every[d] for d in col.derived}, bad


def _listed(a: np.ndarray) -> list[float | None]:
    return [None if v != v else v for v in a.tolist()]


def derive_records(
    records: list[Any], m: Manifest
) -> tuple[list[Any], dict[str, list[Any]], list[dict[str, Any]]]:
    """For the native API, before validation: each record's date-time fields replaced by their
    derived features; the raw fields as columns (for the normal-record sink); and the
    problems (record, field, reason, message). A record with a problem gets placeholder
    features, so that only the date-time field is named."""
    if not m.datetime_columns:
        return records, {}, []
    out = [dict(r) if isinstance(r, dict) else r for r in records]
    raw: dict[str, list[Any]] = {}
    errors: list[dict[str, Any]] = []
    for col in m.datetime_columns:
        given = [r.pop(col.name, ABSENT) if isinstance(r, dict) else ABSENT for r in out]
        derived, bad = derive(given, col)
        problems = {i: (e.reason, e.message) for i, e in bad}
        if not col.nullable:  # left out: refused; null: scored, and named as unusual
            for i, v in enumerate(given):
                if isinstance(out[i], dict) and v is ABSENT:
                    problems[i] = ("missing", "is required (never missing in training)")
        columns = {k: _listed(v) for k, v in derived.items()}
        for i in problems:
            for values in columns.values():
                values[i] = 0.0
        for i, r in enumerate(out):
            if isinstance(r, dict):
                r.update({k: values[i] for k, values in columns.items()})
        errors += [
            {"record": i, "field": col.name, "reason": reason, "message": msg}
            for i, (reason, msg) in sorted(problems.items())
        ]
        raw[col.name] = [None if v is ABSENT else v for v in given]
    return out, raw, errors


def derive_column(values: list[Any], col: DateTimeColumn) -> dict[str, list[Any]]:
    """For the V2 API: the derived features of one input's values (None = missing); raises
    NotADateTime naming the first bad entry."""
    derived, bad = derive(values, col)
    if bad:
        i, e = bad[0]
        raise NotADateTime(e.reason, f"input {col.name!r}[{i}]: {e.message}")
    return {k: _listed(v) for k, v in derived.items()}
