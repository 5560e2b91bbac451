"""The native API (``/v1``): records as JSON objects in, one result per record out."""

from __future__ import annotations

import math
import operator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from service import metrics, timefeatures
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
from service.http import JSON, ScorerDep, current_scorer, offload, read_json
from service.http import score as score_with
from service.scoring import Scored, Scorer, top_features
from service.settings import Settings

MAX_LISTED_ERRORS = 100
MAX_EXPLAIN = 1000
FLOAT_MAX = 1.7976931348623157e308


# ---------------------------------------------------------------- record validation


class _Missing:
    pass


MISSING = _Missing()


def _check(
    f: NumericFeature | BooleanFeature | CategoricalFeature, v: Any, max_len: int
) -> tuple[Any, str | None, str]:
    """(value for the model, error reason or None, error message)."""
    if v is MISSING or v is None:
        if f.nullable:
            return None, None, ""
        what = "is required" if v is MISSING else "must not be null"
        return None, "missing", f"{what} (this feature was never missing in training)"
    if isinstance(f, NumericFeature):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None, "wrong_type", f"expected a number, got {type(v).__name__}"
        try:
            fv = float(v)
        except OverflowError:
            return None, "not_finite", "too large for a number"
        if not math.isfinite(fv):
            return None, "not_finite", "must be a finite number"
        return fv, None, ""
    if isinstance(f, BooleanFeature):
        if isinstance(v, bool):
            return v, None, ""
        if isinstance(v, int | float) and v in (0, 1):  # 1.0 is the number 1 in JSON
            return bool(v), None, ""
        return None, "wrong_type", f"expected true or false, got {type(v).__name__}"
    if isinstance(v, str):
        if len(v) > max_len:
            return None, "too_long", f"longer than {max_len} characters"
        return v, None, ""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v), None, ""
    if isinstance(v, float) and v.is_integer():  # 7.0 is the integer 7 in JSON
        return str(int(v)), None, ""
    return None, "wrong_type", f"expected a string, got {type(v).__name__}"


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


def records_to_columns(body: Any, m: Manifest, s: Settings) -> tuple[dict[str, list[Any]], int]:
    """Validate ``{"records": [...]}``; return feature name -> values, or raise InvalidRecords."""
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise InvalidRecords(
            'the body must be a JSON object {"records": [...]}',
            [
                {
                    "record": None,
                    "field": "records",
                    "reason": "wrong_type",
                    "message": "expected a list of records",
                }
            ],
        )
    extra = sorted(body.keys() - {"records"}) if len(body) > 1 else []
    records = body["records"]
    n = len(records)
    if extra:
        raise InvalidRecords(
            f"unknown top-level field(s) {extra}",
            [
                {"record": None, "field": k, "reason": "unknown_field", "message": "unknown field"}
                for k in extra
            ],
        )
    if n == 0 or n > s.max_records:
        size = "empty_batch" if n == 0 else "batch_too_large"
        metrics.INVALID_RECORDS.labels(size).inc()
        raise InvalidRecords(
            f"a request holds 1 to {s.max_records} records, this one {n}",
            [
                {
                    "record": None,
                    "field": "records",
                    "reason": size,
                    "message": f"{n} records; 1 to {s.max_records} allowed",
                }
            ],
        )
    # date-time fields -> their time features, before validation; raw kept for the sink
    records, raw, errors = timefeatures.derive_records(records, m)
    fast = None if errors else _fast_columns(records, m, s)
    if fast is not None:
        fast.update(raw)
        return fast, n
    feats = m.features
    known = {f.name for f in feats}
    ignored = set(m.ignored_columns)
    columns: dict[str, list[Any]] = {f.name: [None] * n for f in feats}
    time_errors = {e["record"]: e["reason"] for e in reversed(errors)}
    bad_records = 0
    for i, rec in enumerate(records):
        first: str | None = time_errors.get(i)
        if not isinstance(rec, dict):
            errors.append(
                {
                    "record": i,
                    "field": None,
                    "reason": "not_an_object",
                    "message": f"expected an object, got {type(rec).__name__}",
                }
            )
            first = "not_an_object"
        else:
            if s.unknown_fields == "reject":
                for key in rec:
                    if key not in known and key not in ignored:
                        errors.append(
                            {
                                "record": i,
                                "field": str(key),
                                "reason": "unknown_field",
                                "message": "the model has no such feature",
                            }
                        )
                        first = first or "unknown_field"
            for f in feats:
                value, reason, msg = _check(f, rec.get(f.name, MISSING), s.max_string_length)
                if reason:
                    errors.append({"record": i, "field": f.name, "reason": reason, "message": msg})
                    first = first or reason
                else:
                    columns[f.name][i] = value
        if first:
            bad_records += 1
            metrics.INVALID_RECORDS.labels(first).inc()
    if errors:
        errors.sort(key=lambda e: e["record"] if e["record"] is not None else -1)
        shown = errors[:MAX_LISTED_ERRORS]
        more = (
            f" (first {len(shown)} of {len(errors)} errors listed)"
            if len(errors) > len(shown)
            else ""
        )
        raise InvalidRecords(f"{bad_records} of {n} records are invalid{more}", shown)
    columns.update(raw)
    return columns, n


# ---------------------------------------------------------------- OpenAPI schema of a model


def request_model(m: Manifest, max_records: int, max_string_length: int) -> type[BaseModel]:
    """A pydantic model of the score request for this bundle's features (for the OpenAPI
    schema only: validation is :func:`records_to_columns`, which accepts exactly this)."""
    fields: dict[str, Any] = {}
    derived = timefeatures.derived_names(m)
    for f in m.features:
        if f.name in derived:
            continue  # sent as its date-time field, below
        typ: Any
        if isinstance(f, NumericFeature):
            typ = Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)]
            desc = f"number; seen in training from {f.min:g} to {f.max:g}"
        elif isinstance(f, BooleanFeature):
            typ, desc = bool | Literal[0, 1], "true or false (or 1 or 0)"
        else:
            cats = [c for c in f.categories if c not in (UNKNOWN_TOKEN, MISSING_TOKEN)]
            typ = Annotated[str, Field(max_length=max_string_length)] | int
            desc = (
                "one of "
                + ", ".join(repr(c) for c in cats[:50])
                + (" ..." if len(cats) > 50 else "")
                + "; other values are scored as never seen and flagged; an integer is read as "
                "its decimal string (then usually never seen)"
            )
        if f.nullable:
            fields[f.name] = (typ | None, Field(None, description=desc + "; may be null"))
        else:
            fields[f.name] = (typ, Field(..., description=desc + "; required"))
    for d in m.datetime_columns:
        typ, desc = (
            (Annotated[str, Field(max_length=timefeatures.MAX_LENGTH)], "ISO 8601 date-time")
            if d.unit == "iso"
            else (Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)], f"{d.unit} number")
        )
        desc += f"; time of day and day of week are derived ({d.timezone} time)"
        fields[d.name] = (
            (typ | None, Field(None, description=desc + "; may be null"))
            if d.nullable
            else (typ, Field(..., description=desc + "; required"))
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


class RecordResult(BaseModel):
    score: float = Field(description="higher = more anomalous")
    is_anomaly: bool = Field(description="score > threshold")
    threshold: float
    percentile: float = Field(description="percentile of the score among normal records, 0-100")
    top_features: list[FeatureShare]
    unknown_categories: list[str] = Field(description="features whose value was never seen")


class ModelRef(BaseModel):
    name: str
    version: str
    score_type: ScoreType


class ScoreResponse(BaseModel):
    model: ModelRef
    results: list[RecordResult]


def results_json(scorer: Scorer, scored: Scored, explain: int) -> dict[str, Any]:
    m = scorer.manifest
    tops = top_features(scorer.feature_names, scored, explain)
    unknown = [[] for _ in range(len(scored.score))]  # type: list[list[str]]
    for name, rows in scored.unknown.items():
        for i in rows.nonzero()[0]:
            unknown[i].append(name)
    thr = scored.threshold
    return {
        "model": {"name": m.name, "version": m.version, "score_type": scored.score_type},
        "results": [
            {
                "score": sc,
                "is_anomaly": an,
                "threshold": thr,
                "percentile": round(p, 3),
                "top_features": top,
                "unknown_categories": unk,
            }
            for sc, an, p, top, unk in zip(
                scored.score.tolist(),
                scored.is_anomaly.tolist(),
                scored.percentile.tolist(),
                tops,
                unknown,
                strict=True,
            )
        ],
    }


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
]


def query_options(request: Request, scorer: Scorer, settings: Settings) -> tuple[str | None, int]:
    """(score type or None for the model's default, top features per record) from the query
    string; or raise InvalidParameters (422) naming each bad parameter."""
    if not request.scope["query_string"]:
        return None, settings.explain
    q = request.query_params
    score, explain = q.get("score"), q.get("explain")
    errors = []
    if score is not None and score not in scorer.manifest.score_types:
        allowed = ", ".join(scorer.manifest.score_types)
        errors.append(_param_error("score", "literal_error", f"expected one of {allowed}"))
    k = settings.explain
    if explain is not None:
        try:
            k = int(explain)
        except ValueError:
            errors.append(_param_error("explain", "int_parsing", "expected an integer"))
        else:
            if not 0 <= k <= MAX_EXPLAIN:
                errors.append(_param_error("explain", "out_of_range", f"0 to {MAX_EXPLAIN}"))
    if errors:
        raise InvalidParameters("invalid query parameters", errors)
    return score, k


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
    score_type, k = query_options(request, scorer, settings)
    body = await read_json(request, settings.max_body_bytes)
    size = (
        len(body["records"])
        if isinstance(body, dict) and isinstance(body.get("records"), list)
        else 0
    )
    columns, n = await offload(size, records_to_columns, body, scorer.manifest, settings)
    scored = await score_with(request, scorer, columns, n, score_type)
    return JSON(await offload(n, results_json, scorer, scored, k))


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
