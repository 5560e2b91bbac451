"""The native API (``/v1``): records as JSON objects in, one result per record out."""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from service import latent, values
from service.auth import check_api_key, require_api_key
from service.bundle import SCORE_TYPES, ScoreType
from service.errors import ERROR_RESPONSES, InvalidParameters
from service.http import (
    JSON,
    ScorerDep,
    current_scorer,
    offload,
    parse_body,
    read_body,
    score_in,
)
from service.records import Parsed, parsed_and_ids
from service.scoring import Scored, Scorer, top_features
from service.settings import Settings

MAX_EXPLAIN = 1000
INTEGER = re.compile(r"-?[0-9]{1,9}\Z")


# ---------------------------------------------------------------- response


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
    # FastRoutes calls this directly (the hot path: no routing or dependency injection), so
    # it takes only the request and does its own checks
    check_api_key(request)
    scorer = current_scorer(request)
    settings: Settings = request.app.state.settings
    score_type, k, skip = query_options(request, scorer, settings)
    body = await read_body(request, settings.max_body_bytes)
    sink_on = request.app.state.sink is not None
    parsed, ids = await parse_body(
        request, body, parsed_and_ids, scorer.records, settings, skip, sink_on
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
