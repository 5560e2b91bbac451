"""Records as JSON objects (``{"records": [...]}``) validated into columns of values, by the
rules every entry point shares (service/values.py): a value the model never saw is accepted (to
be scored and named); only what cannot be a value of its field is an error (field, reason)."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service import metrics, timefeatures, values
from service.bundle import BooleanFeature, CategoricalFeature, Manifest, NumericFeature
from service.errors import InvalidRecords
from service.settings import Settings

MAX_LISTED_ERRORS = 100
MAX_RECORD_ERRORS = 10  # errors kept per skipped record (on_invalid=skip)


class _Missing:
    pass


MISSING = _Missing()


def _check(
    f: NumericFeature | BooleanFeature | CategoricalFeature, v: Any, max_len: int
) -> tuple[Any, str | None, str]:
    """(value for the model, error reason or None, error message)."""
    if v is MISSING:
        if f.nullable:
            return None, None, ""
        return None, "missing", "is required (never missing in training; null is accepted)"
    try:
        return values.parse(f.kind, v, max_len), None, ""
    except values.Invalid as e:
        return None, e.reason, e.message


class RecordPlan:
    """What a valid record of one model looks like, for validation: per feature, the exact
    Python types its value may have as given (no conversion needed: the fast path), and the
    field names a record may hold. Built once per model (:attr:`service.scoring.Scorer.records`)."""

    def __init__(self, m: Manifest) -> None:
        self.manifest = m
        self.names = [f.name for f in m.features]
        self.allowed: list[frozenset[type]] = []
        for f in m.features:
            kinds: set[type] = (
                {float, int}
                if isinstance(f, NumericFeature)
                else {bool}
                if isinstance(f, BooleanFeature)
                else {str}
            )
            if f.nullable:
                kinds.add(type(None))
            self.allowed.append(frozenset(kinds))
        self.numeric = [i for i, f in enumerate(m.features) if isinstance(f, NumericFeature)]
        self.strings = [i for i, f in enumerate(m.features) if isinstance(f, CategoricalFeature)]
        self.known = frozenset(self.names) | frozenset(m.ignored_columns)
        self.checks = [a.__contains__ for a in self.allowed]


def _fast_columns(records: list[Any], plan: RecordPlan, s: Settings) -> dict[str, list[Any]] | None:
    """Columns for records that are plainly valid (every value of an expected type, numbers
    finite, strings within the limit); None if any record needs a closer look. (Written for
    speed: this runs for every record the service scores.)"""
    names, checks, known, numeric, strings = (
        plan.names,
        plan.checks,
        plan.known,
        plan.numeric,
        plan.strings,
    )
    reject = s.unknown_fields == "reject"
    max_len = s.max_string_length
    rows = []
    try:
        for rec in records:
            if type(rec) is not dict or (reject and not rec.keys() <= known):
                return None
            row = [rec.get(k) for k in names]
            if not all(map(operator.call, checks, map(type, row))):
                return None
            if not math.isfinite(sum([v for j in numeric if (v := row[j]) is not None])):
                return None
            if max([len(v) for j in strings if (v := row[j]) is not None], default=0) > max_len:
                return None
            rows.append(row)
    except OverflowError:  # an integer beyond any float
        return None
    if len(rows) == 1:
        return {k: [v] for k, v in zip(names, rows[0], strict=True)}
    return dict(zip(names, map(list, zip(*rows, strict=True)), strict=True))


@dataclass
class Parsed:
    """A request's records: the valid ones as columns, the invalid ones' errors (skip mode)."""

    columns: dict[str, list[Any]]
    n: int  # valid records, in ``columns``
    total: int  # records in the request
    invalid: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # index -> errors


def _batch_error(body: Any, s: Settings) -> InvalidRecords | None:
    """What is wrong with the request as a whole (not with one record), if anything."""
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        return InvalidRecords(
            'the body must be a JSON object {"records": [...]}',
            [_error(None, "records", "wrong_type", "expected a list of records")],
        )
    if len(body) > 1:
        extra = list(itertools.islice((k for k in body if k != "records"), MAX_LISTED_ERRORS))
        return InvalidRecords(
            f"{len(body) - 1} unknown top-level field(s), such as {extra[:5]}",
            [_error(None, k, "unknown_field", "unknown field") for k in extra],
        )
    n = len(body["records"])
    if n == 0 or n > s.max_records:
        size = "empty_batch" if n == 0 else "batch_too_large"
        metrics.INVALID_RECORDS.labels(size).inc()
        return InvalidRecords(
            f"a request holds 1 to {s.max_records} records, this one {n}",
            [_error(None, "records", size, f"{n} records; 1 to {s.max_records} allowed")],
        )
    return None


def _error(record: int | None, field: str | None, reason: str, message: str) -> dict[str, Any]:
    return {"record": record, "field": field, "reason": reason, "message": message}


def _record_errors(rec: Any, i: int, plan: RecordPlan, s: Settings, row: list[Any]) -> list[Any]:
    """Check one record, filling ``row`` (one value per feature); return its errors."""
    if not isinstance(rec, dict):
        return [_error(i, None, "not_an_object", f"expected an object, got {type(rec).__name__}")]
    errors = []
    if s.unknown_fields == "reject":
        known = plan.known
        unknown = itertools.islice((k for k in rec if k not in known), MAX_LISTED_ERRORS)
        errors += [
            _error(i, str(k), "unknown_field", "the model has no such feature") for k in unknown
        ]
    for j, f in enumerate(plan.manifest.features):
        row[j], reason, msg = _check(f, rec.get(f.name, MISSING), s.max_string_length)
        if reason:
            errors.append(_error(i, f.name, reason, msg))
    return errors


def records_to_columns(body: Any, plan: RecordPlan, s: Settings, skip: bool = False) -> Parsed:
    """Validate ``{"records": [...]}`` into columns (feature name -> values) for the model of
    ``plan``. An invalid record raises InvalidRecords (422), or with ``skip`` is left out and
    its errors kept."""
    m = plan.manifest
    bad = _batch_error(body, s)
    if bad is not None:
        raise bad
    n = len(body["records"])
    # date-time fields -> their time features, before validation; raw kept for the sink
    records, raw, time_errors = timefeatures.derive_records(body["records"], m)
    fast = None if time_errors else _fast_columns(records, plan, s)
    if fast is not None:
        return Parsed({**fast, **raw}, n, n)
    by_record: dict[int, list[dict[str, Any]]] = {}
    for e in time_errors:
        by_record.setdefault(e["record"], []).append(e)
    rows: list[list[Any]] = []
    errors, invalid = _CappedErrors(), {}
    for i, rec in enumerate(records):
        row: list[Any] = [None] * len(m.features)
        errs = by_record.get(i, []) + _record_errors(rec, i, plan, s, row)
        if errs:
            metrics.INVALID_RECORDS.labels(errs[0]["reason"]).inc()
            errors.extend(errs)
            invalid[i] = errs[:MAX_RECORD_ERRORS]  # kept for skip mode: bounded per record
        else:
            rows.append(row)
    if errors.total and not skip:
        more = (
            f" (first {len(errors)} of {errors.total} errors listed)"
            if errors.total > len(errors)
            else ""
        )
        raise InvalidRecords(f"{len(invalid)} of {n} records are invalid{more}", list(errors))
    names = [f.name for f in m.features]
    columns = {k: [r[j] for r in rows] for j, k in enumerate(names)}
    columns.update({k: [v for i, v in enumerate(vs) if i not in invalid] for k, vs in raw.items()})
    return Parsed(columns, len(rows), n, invalid if skip else {})


class _CappedErrors(list[dict[str, Any]]):
    """Keeps the first MAX_LISTED_ERRORS errors and counts the others: a hostile body can
    hold millions (a record of a million unknown fields)."""

    total = 0

    def append(self, error: dict[str, Any]) -> None:
        self.total += 1
        if len(self) < MAX_LISTED_ERRORS:
            super().append(error)

    def extend(self, errors: Iterable[dict[str, Any]]) -> None:
        for e in errors:
            self.append(e)


def parsed_and_ids(
    body: Any, plan: RecordPlan, s: Settings, skip: bool, with_ids: bool
) -> tuple[Parsed, list[dict[str, Any]] | None]:
    """:func:`records_to_columns`, plus the id columns (the ones training ignored) of each
    valid record when the sink wants them (it writes them beside the record)."""
    parsed = records_to_columns(body, plan, s, skip)
    m = plan.manifest
    if not (with_ids and m.ignored_columns):
        return parsed, None
    ids = [
        {c: r[c] for c in m.ignored_columns if c in r} if isinstance(r, dict) else {}
        for i, r in enumerate(body["records"])
        if i not in parsed.invalid
    ]
    return parsed, ids
