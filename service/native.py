"""The native API (``/v1``): records as JSON objects in, one result per record out."""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from service import latent, metrics, timefeatures, values
from service.auth import check_api_key, require_api_key
from service.bundle import (
    MISSING_TOKEN,
    SCORE_TYPES,
    UNKNOWN_TOKEN,
    BooleanFeature,
    CategoricalFeature,
    Manifest,
    NumericFeature,
    ScoreType,
)
from service.errors import ERROR_RESPONSES, InvalidParameters, InvalidRecords
from service.http import (
    JSON,
    ScorerDep,
    current_scorer,
    offload,
    parse_body,
    read_body,
    score_in,
)
from service.scoring import Scored, Scorer, top_features
from service.settings import Settings

MAX_LISTED_ERRORS = 100
MAX_RECORD_ERRORS = 10  # errors kept per skipped record (on_invalid=skip)
MAX_EXPLAIN = 1000
INTEGER = re.compile(r"-?[0-9]{1,9}\Z")
FLOAT_MAX = 1.7976931348623157e308


# ---------------------------------------------------------------- record validation


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


class _Plan:
    """What a valid record of one model looks like, for the fast path of validation: per
    feature, the exact Python types its value may have as given (no conversion needed)."""

    def __init__(self, m: Manifest) -> None:
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


_plans: dict[tuple[str, str], _Plan] = {}


def _plan(m: Manifest) -> _Plan:
    key = (m.name, m.version)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 8:
            _plans.clear()
        plan = _plans[key] = _Plan(m)
    return plan


def _fast_columns(records: list[Any], m: Manifest, s: Settings) -> dict[str, list[Any]] | None:
    """Columns for records that are plainly valid (every value of an expected type, numbers
    finite, strings within the limit); None if any record needs a closer look. (Written for
    speed: this runs for every record the service scores.)"""
    plan = _plan(m)
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


def _record_errors(rec: Any, i: int, m: Manifest, s: Settings, row: list[Any]) -> list[Any]:
    """Check one record, filling ``row`` (one value per feature); return its errors."""
    if not isinstance(rec, dict):
        return [_error(i, None, "not_an_object", f"expected an object, got {type(rec).__name__}")]
    errors = []
    if s.unknown_fields == "reject":
        known = _plan(m).known
        unknown = itertools.islice((k for k in rec if k not in known), MAX_LISTED_ERRORS)
        errors += [
            _error(i, str(k), "unknown_field", "the model has no such feature") for k in unknown
        ]
    for j, f in enumerate(m.features):
        row[j], reason, msg = _check(f, rec.get(f.name, MISSING), s.max_string_length)
        if reason:
            errors.append(_error(i, f.name, reason, msg))
    return errors


def records_to_columns(body: Any, m: Manifest, s: Settings, skip: bool = False) -> Parsed:
    """Validate ``{"records": [...]}`` into columns (feature name -> values). An invalid record
    raises InvalidRecords (422), or with ``skip`` is left out and its errors kept."""
    bad = _batch_error(body, s)
    if bad is not None:
        raise bad
    n = len(body["records"])
    # date-time fields -> their time features, before validation; raw kept for the sink
    records, raw, time_errors = timefeatures.derive_records(body["records"], m)
    fast = None if time_errors else _fast_columns(records, m, s)
    if fast is not None:
        return Parsed({**fast, **raw}, n, n)
    by_record: dict[int, list[dict[str, Any]]] = {}
    for e in time_errors:
        by_record.setdefault(e["record"], []).append(e)
    rows: list[list[Any]] = []
    errors, invalid = _CappedErrors(), {}
    for i, rec in enumerate(records):
        row: list[Any] = [None] * len(m.features)
        errs = by_record.get(i, []) + _record_errors(rec, i, m, s, row)
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
    body: Any, m: Manifest, s: Settings, skip: bool, with_ids: bool
) -> tuple[Parsed, list[dict[str, Any]] | None]:
    """:func:`records_to_columns`, plus the id columns (the ones training ignored) of each
    valid record when the sink wants them (it writes them beside the record)."""
    parsed = records_to_columns(body, m, s, skip)
    if not (with_ids and m.ignored_columns):
        return parsed, None
    ids = [
        {c: r[c] for c in m.ignored_columns if c in r} if isinstance(r, dict) else {}
        for i, r in enumerate(body["records"])
        if i not in parsed.invalid
    ]
    return parsed, ids


# ---------------------------------------------------------------- OpenAPI schema of a model


def _field_type(f: NumericFeature | BooleanFeature | CategoricalFeature, max_len: int) -> Any:
    """The JSON types :func:`values.parse` accepts for ``f`` (null: missing, always accepted)."""
    number = Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)]
    text_number = Annotated[str, Field(pattern=values.NUMBER_PATTERN)]
    if isinstance(f, NumericFeature):
        return number | text_number | None
    if isinstance(f, BooleanFeature):
        words = Literal[tuple(sorted(values.TRUE_WORDS | values.FALSE_WORDS))]  # type: ignore[valid-type]
        return bool | number | words | text_number | None
    return Annotated[str, Field(max_length=max_len)] | number | bool | None


def _field_doc(f: NumericFeature | BooleanFeature | CategoricalFeature) -> str:
    if isinstance(f, NumericFeature):
        return (
            f"a number (or its decimal text); seen in training from {f.min:g} to {f.max:g}; "
            "a value far outside is scored and named in unusual_values"
        )
    if isinstance(f, BooleanFeature):
        return (
            "true or false (or 1/0, yes/no, y/n, t/f, on/off); another number is scored as "
            "missing and named in unusual_values"
        )
    cats = [c for c in f.categories if c not in (UNKNOWN_TOKEN, MISSING_TOKEN)]
    return (
        "one of "
        + ", ".join(repr(c) for c in cats[:50])
        + (" ..." if len(cats) > 50 else "")
        + "; other values are scored as never seen and named in unusual_values; a number is "
        "read as its decimal text"
    )


def request_model(m: Manifest, max_records: int, max_string_length: int) -> type[BaseModel]:
    """A pydantic model of the score request for this bundle's features (for the OpenAPI
    schema only: validation is :func:`records_to_columns`, which accepts exactly this)."""
    fields: dict[str, Any] = {}
    derived = timefeatures.derived_names(m)
    for f in m.features:
        if f.name in derived:
            continue  # sent as its date-time field, below
        typ, desc = _field_type(f, max_string_length), _field_doc(f)
        if f.nullable:
            fields[f.name] = (typ, Field(None, description=desc + "; may be null or left out"))
        else:
            desc += "; required (null is scored as unusual: it was never missing in training)"
            fields[f.name] = (typ, Field(..., description=desc))
    for d in m.datetime_columns:
        typ, desc = (
            (Annotated[str, Field(max_length=timefeatures.MAX_LENGTH)], "ISO 8601 date-time")
            if d.unit == "iso"
            else (Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)], f"{d.unit} number")
        )
        desc += f"; time of day and day of week are derived ({d.timezone} time)"
        required = "; may be null or left out" if d.nullable else "; required (null is unusual)"
        fields[d.name] = (
            typ | None,
            Field(None if d.nullable else ..., description=desc + required),
        )
    for c in m.ignored_columns:
        fields[c] = (Any, Field(None, description="accepted and ignored (excluded in training)"))
    record = create_model(
        "Record", __config__=ConfigDict(extra="forbid"), __doc__="One record.", **fields
    )
    return create_model(
        "ScoreRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(list[record], Field(..., min_length=1, max_length=max_records)),  # type: ignore[valid-type]
    )


class FeatureShare(BaseModel):
    name: str
    share: float = Field(description="share of the score in excess of normal, 0 to 1")
    # what the model expected of the feature from the rest of the record (service/latent.py;
    # absent for a bundle trained without the latent-space files)
    value: Any = Field(None, description="the record's value (null: missing)")
    expected: Any = Field(None, description="the decoded value, category or boolean")
    range: list[float] | None = Field(None, description="numeric: central 90% range expected")
    p: float | None = Field(None, description="probability of the expected category/boolean")
    p_missing: float | None = Field(None, description="a missing value: P(missing) expected")


class UnusualValue(BaseModel):
    field: str
    value: Any = Field(description="the value as read (null: missing)")
    kind: Literal["missing", "out_of_range", "not_boolean", "unseen_category"]
    why: str


class RecordResult(BaseModel):
    score: float = Field(description="higher = more anomalous")
    is_anomaly: bool = Field(description="score > threshold")
    threshold: float
    percentile: float = Field(description="percentile of the score among normal records, 0-100")
    top_features: list[FeatureShare]
    unknown_categories: list[str] = Field(description="features whose value was never seen")
    unusual_values: list[UnusualValue] = Field(
        description="values the model never saw in training (scored, and never as normal)"
    )


class FieldError(BaseModel):
    field: str | None
    reason: str
    message: str


class RecordError(BaseModel):
    """An invalid record, in its place among the results (``on_invalid=skip``)."""

    error: str
    errors: list[FieldError]


class ModelRef(BaseModel):
    name: str
    version: str
    score_type: ScoreType


class ScoreResponse(BaseModel):
    model: ModelRef
    results: list[RecordResult | RecordError]


def _unusual(
    scorer: Scorer, scored: Scored, columns: dict[str, list[Any]]
) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[] for _ in range(len(scored.score))]
    feats = {f.name: f for f in scorer.manifest.features}
    for name, kind, rows in scored.unusual:
        why = values.why(feats[name], kind)
        for i in rows.nonzero()[0].tolist():
            out[i].append({"field": name, "value": columns[name][i], "kind": kind, "why": why})
    return out


def results_json(
    scorer: Scorer,
    parsed: Parsed,
    scored: Scored | None,
    explain: int,
    score_type: str | None = None,
) -> dict[str, Any]:
    """The response: one result per record, in order (an invalid one's errors in its place)."""
    m = scorer.manifest
    results: list[dict[str, Any]] = []
    if scored is not None:
        tops = top_features(scorer.feature_names, scored, explain)
        latent.explain(scored.expected, tops, parsed.columns)
        unknown = [[] for _ in range(len(scored.score))]  # type: list[list[str]]
        for name, rows in scored.unknown.items():
            for i in rows.nonzero()[0]:
                unknown[i].append(name)
        thr = scored.threshold
        results = [
            {
                "score": sc,
                "is_anomaly": an,
                "threshold": thr,
                "percentile": round(p, 3),
                "top_features": top,
                "unknown_categories": unk,
                "unusual_values": odd,
            }
            for sc, an, p, top, unk, odd in zip(
                scored.score.tolist(),
                scored.is_anomaly.tolist(),
                scored.percentile.tolist(),
                tops,
                unknown,
                _unusual(scorer, scored, parsed.columns),
                strict=True,
            )
        ]
    for index in sorted(parsed.invalid):  # in index order, so each insert lands in its place
        errs = parsed.invalid[index]
        results.insert(
            index,
            {
                "error": f"record {index} is invalid: {errs[0]['field']}: {errs[0]['message']}",
                "errors": [{k: e[k] for k in ("field", "reason", "message")} for e in errs],
            },
        )
    st = scored.score_type if scored is not None else score_type or m.default_score
    return {"model": {"name": m.name, "version": m.version, "score_type": st}, "results": results}


# ---------------------------------------------------------------- routes

router = APIRouter(prefix="/v1", tags=["native"])

QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "score",
        "in": "query",
        "required": False,
        "description": "score type; default: the model's",
        "schema": {"type": "string", "enum": list(SCORE_TYPES)},
    },
    {
        "name": "explain",
        "in": "query",
        "required": False,
        "description": "top features per record; default: the service's setting",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EXPLAIN},
    },
    {
        "name": "on_invalid",
        "in": "query",
        "required": False,
        "description": "reject: an invalid record fails the request (422); skip: the valid "
        "records are scored and each invalid one gets its errors in its place",
        "schema": {"type": "string", "enum": ["reject", "skip"]},
    },
]


def query_options(
    request: Request, scorer: Scorer, settings: Settings
) -> tuple[str | None, int, bool]:
    """(score type or None for the model's default, top features per record, skip invalid
    records) from the query string; or raise InvalidParameters (422) naming each bad one."""
    if not request.scope["query_string"]:
        return None, settings.explain, False
    q = request.query_params
    score, explain, on_invalid = q.get("score"), q.get("explain"), q.get("on_invalid")
    errors = []
    if on_invalid not in (None, "reject", "skip"):
        errors.append(_param_error("on_invalid", "literal_error", "expected reject or skip"))
    if score is not None and score not in scorer.manifest.score_types:
        allowed = ", ".join(scorer.manifest.score_types)
        errors.append(_param_error("score", "literal_error", f"expected one of {allowed}"))
    k = settings.explain
    if explain is not None:
        if not INTEGER.match(explain):  # int() would read "1_0" as 10, "١" as 1
            errors.append(_param_error("explain", "int_parsing", "expected an integer"))
        else:
            k = int(explain)
            if not 0 <= k <= MAX_EXPLAIN:
                errors.append(_param_error("explain", "out_of_range", f"0 to {MAX_EXPLAIN}"))
    if errors:
        raise InvalidParameters("invalid query parameters", errors)
    return score, k, on_invalid == "skip"


def _param_error(field: str, reason: str, message: str) -> dict[str, Any]:
    return {"record": None, "field": field, "reason": reason, "message": message}


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_class=JSON,
    summary="Score records",
    openapi_extra={"parameters": QUERY_PARAMETERS},
    responses=ERROR_RESPONSES,
)
async def score_records(request: Request) -> JSON:
    """Score 1 to ``max_records`` records. Each result has the score, the verdict, the
    threshold, the percentile among normal records and the features that drove the score."""
    # ServiceApp calls this directly (the hot path: no routing or dependency injection), so it
    # takes only the request and does its own checks
    check_api_key(request)
    scorer = current_scorer(request)
    settings: Settings = request.app.state.settings
    score_type, k, skip = query_options(request, scorer, settings)
    body = await read_body(request, settings.max_body_bytes)
    sink_on = request.app.state.sink is not None
    parsed, ids = await parse_body(
        request, body, parsed_and_ids, scorer.manifest, settings, skip, sink_on
    )
    scored = None
    if parsed.n:
        state = request.app.state
        scored = await score_in(state, scorer, parsed.columns, parsed.n, score_type, ids)
    return JSON(await offload(parsed.n, results_json, scorer, parsed, scored, k, score_type))


@router.get(
    "/model",
    summary="The model being served",
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)
async def model_info(scorer: ScorerDep) -> dict[str, Any]:
    m = scorer.manifest
    return {
        "name": m.name,
        "version": m.version,
        "created_at": m.created_at.isoformat(),
        "parent_version": m.parent_version,
        "default_score": m.default_score,
        "score_types": m.score_types,
        "target_fpr": m.target_fpr,
        "thresholds": {k: v.model_dump() for k, v in m.thresholds.items()},
        "features": [f.model_dump() for f in m.features],
        "datetime_columns": [c.model_dump() for c in m.datetime_columns],
        "ignored_columns": m.ignored_columns,
        "metrics": m.metrics,
        "data": m.data.model_dump(),
    }
