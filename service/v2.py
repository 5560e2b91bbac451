"""The Open Inference Protocol (KServe V2) REST endpoints.

One input tensor per feature, shape ``[N]`` (or ``[N, 1]``): ``FP32``/``FP64``/``INT*``/``UINT*``
for numerics, ``BOOL`` for booleans, ``BYTES`` for categoricals — or any datatype whose values
are values of the feature by the rules of service/values.py. A nullable feature may be left
out (all missing); ``null`` entries are missing. Outputs ``score`` (FP64), ``is_anomaly`` (BOOL)
and ``percentile`` (FP64), each ``[N]``; values the model never saw are listed in the response's
``parameters.unusual_values``. Request ``parameters`` may set ``score_type``. Errors are
``{"error": "..."}``. Tensors may also come and go as binary data (:mod:`service.v2_binary`);
``POST /v2/repository/index`` lists the served model for Triton's tools.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import State

from service import __version__, v2_binary, values
from service.auth import check_api_key, require_api_key
from service.bundle import Manifest, ScoreType
from service.errors import V2_ERROR_RESPONSES, BadRequest, NotFound
from service.http import (
    JSON,
    ScorerDep,
    current_scorer,
    offload,
    parse_body,
    parse_json,
    read_body,
    score_in,
)
from service.scoring import Scored, Scorer
from service.settings import Settings
from service.v2_request import (
    OUTPUTS,
    Column,
    Datatype,
    Parsed,
    client_inputs,
    feature_datatype,
    parse,
)

EXTENSIONS = ["binary_tensor_data"]

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


# ---------------------------------------------------------------- the request, for OpenAPI only


class InferenceTensor(BaseModel):
    name: str = Field(description="a feature name")
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=2)] = Field(
        description="[N] or [N, 1]"
    )
    datatype: Datatype
    data: list[Any] = Field(description="N values, flat or nested as the shape")
    parameters: dict[str, Any] | None = None


class InferenceParameters(BaseModel):
    score_type: ScoreType | None = None
    binary_data_output: bool | None = Field(None, description="every output as binary data")


class OutputParameters(BaseModel):
    binary_data: bool | None = Field(None, description="this output as binary data")


class RequestedOutput(BaseModel):
    name: Literal["score", "is_anomaly", "percentile"]
    parameters: OutputParameters | None = None


class InferenceRequest(BaseModel):
    """An inference request: one tensor per feature (validated by service.v2_request.parse)."""

    id: Any = Field(None, description="echoed in the response")
    parameters: InferenceParameters | None = None
    inputs: list[InferenceTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def check_model(scorer: Scorer, name: str, version: str | None) -> None:
    m = scorer.manifest
    if name != m.name:  # (a name from the path is cut short: a 30 kB one is no model's)
        raise NotFound(f"unknown model {name!r:.100}; this server serves {m.name!r}")
    if version is not None and version != m.version:
        raise NotFound(f"model {name!r} has no version {version!r:.100}; serving {m.version!r}")


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "vae-anomaly", "version": __version__, "extensions": EXTENSIONS}


EMPTY: dict[str, Any] = {"response_class": Response}
NOT_READY: dict[int | str, dict[str, Any]] = {400: {"description": "not ready", "content": None}}


@router.get("/health/live", summary="Server live", responses={200: {"content": None}}, **EMPTY)
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready",
    summary="Server ready",
    responses={200: {"content": None}, **NOT_READY},
    **EMPTY,
)
async def ready(request: Request) -> Response:
    scorer: Scorer | None = request.app.state.models.scorer
    return Response(status_code=200 if scorer is not None and scorer.ready else 400)


PROTECTED: dict[str, Any] = {
    "dependencies": [Depends(require_api_key)],
    "responses": V2_ERROR_RESPONSES,
}


@router.get("/models/{name}", summary="Model metadata", **PROTECTED)
@router.get("/models/{name}/versions/{version}", summary="Model metadata (a version)", **PROTECTED)
async def model_metadata(
    name: str, scorer: ScorerDep, version: str | None = None
) -> dict[str, Any]:
    check_model(scorer, name, version)
    return metadata(scorer)


def metadata(scorer: Scorer) -> dict[str, Any]:
    """The model's V2 metadata (REST and gRPC)."""
    m = scorer.manifest
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": f.name, "datatype": feature_datatype(f), "shape": [-1]}
            for f in client_inputs(m)
        ],
        "outputs": [{"name": k, "datatype": v, "shape": [-1]} for k, v in OUTPUTS.items()],
    }


MODEL_READY: dict[str, Any] = {
    "responses": {200: {"content": None}, **V2_ERROR_RESPONSES},
    "response_class": Response,
}


@router.get("/models/{name}/ready", summary="Model ready", **MODEL_READY)
@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model ready (a version)", **MODEL_READY
)
async def model_ready(name: str, scorer: ScorerDep, version: str | None = None) -> Response:
    check_model(scorer, name, version)
    return Response(status_code=200)


def unusual_values(m: Manifest, scored: Scored, columns: dict[str, Column]) -> list[Any]:
    """The values the model never saw, as ``parameters.unusual_values``: a list of
    ``{"index", "field", "value", "kind", "why"}`` (index: the record's position)."""
    feats = {f.name: f for f in m.features}
    out = [
        {"index": i, "field": name, "value": columns[name][i], "kind": kind}
        | {"why": values.why(feats[name], kind)}
        for name, kind, rows in scored.unusual
        for i in rows.nonzero()[0].tolist()
    ]
    return sorted(out, key=lambda u: u["index"])


INFER_BODY = {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
BINARY_BODY = {
    "schema": {"type": "string", "format": "binary"},
    "description": "binary tensor data extension: the JSON request (as many bytes as the "
    "Inference-Header-Content-Length header says), then the inputs' raw bytes",
}


def _infer_doc(with_version: bool) -> dict[str, Any]:
    """OpenAPI of the infer routes (their endpoint takes only the request: see :func:`infer`)."""
    path = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if with_version:
        path.append(
            {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "binary tensor data extension: the length of the JSON part of the body",
        "schema": {"type": "integer", "minimum": 0},
    }
    ok = {
        "description": "the inference response (with binary outputs when asked: "
        "the JSON response, then their raw bytes)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            v2_binary.OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
        },
    }
    return {
        "responses": {200: ok, **V2_ERROR_RESPONSES},
        "response_class": Response,
        "openapi_extra": {
            "parameters": [*path, header],
            "requestBody": {
                "required": True,
                "content": {"application/json": INFER_BODY, v2_binary.OCTET_STREAM: BINARY_BODY},
            },
        },
    }


@router.post("/models/{name}/infer", summary="Inference", **_infer_doc(False))
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference (a version)",
    **_infer_doc(True),
)
async def infer(request: Request) -> Response:
    """Inference, JSON or binary tensors (REST). ``FastRoutes`` (service/middleware.py) calls
    this directly (the hot path: no routing or dependency injection), so it takes only the
    request, its path parameters in ``request.path_params``, and does its own checks."""
    check_api_key(request)
    scorer = current_scorer(request)
    path = request.path_params
    check_model(scorer, path["name"], path.get("version"))
    settings: Settings = request.app.state.settings
    header = v2_binary.header_length(request.scope["headers"])
    raw = await read_body(request, settings.max_body_bytes, binary=True)
    # the header, not the content type, says a body is binary (clients send either type)
    if header is None:  # JSON: a big body is parsed in the parser process (service/http.py)
        parsed = await parse_body(request, raw, parse, scorer.manifest, settings)
    else:  # decoded to arrays, validated array-wide: inline up to ~8 KiB (~2,000 BYTES values)
        parsed = await offload(len(raw) >> 7, _parse_binary, raw, header, scorer.manifest, settings)
    out, arrays = await respond(request.app.state, scorer, parsed)
    binary = parsed[-1]
    if not binary:
        return JSON(out)
    content, length = v2_binary.response(out, arrays, binary)
    return Response(
        content,
        media_type=v2_binary.OCTET_STREAM,
        headers={"Inference-Header-Content-Length": str(length)},
    )


def _parse_binary(raw: bytes, header: str, m: Manifest, settings: Settings) -> Parsed:
    request, split = v2_binary.split_request(raw, header)
    return parse(request, m, settings, (raw, split))


async def run_infer(
    state: State,
    scorer: Scorer,
    settings: Settings,
    body: Any,
    size: int,
    tail: tuple[bytes, int] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate and score a gRPC inference request given as JSON (``size``: its values;
    ``tail``: its tensors' bytes, when they are binary tensors: see ``parse``)."""
    parsed = await offload(size, parse, body, scorer.manifest, settings, tail)
    return await respond(state, scorer, parsed, on_loop=False)


async def respond(
    state: State, scorer: Scorer, parsed: Parsed, on_loop: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score a validated request (REST, binary REST and gRPC all come here): (the JSON
    response, the output arrays by name)."""
    columns, n, score_type, names, rid, _ = parsed
    scored = await score_in(state, scorer, columns, n, score_type, on_loop=on_loop)
    arrays = {
        "score": scored.score,
        "is_anomaly": scored.is_anomaly,
        "percentile": scored.percentile,
    }
    m = scorer.manifest
    params: dict[str, Any] = {"score_type": scored.score_type, "threshold": scored.threshold}
    if scored.unusual:
        params["unusual_values"] = unusual_values(m, scored, columns)
    out: dict[str, Any] = {
        "model_name": m.name,
        "model_version": m.version,
        "outputs": [
            {"name": o, "datatype": OUTPUTS[o], "shape": [n], "data": arrays[o]} for o in names
        ],
        "parameters": params,
    }
    if rid is not None:
        out["id"] = rid
    return out, arrays


class RepositoryIndexRequest(BaseModel):
    ready: bool | None = Field(None, description="true: only the models ready for inference")


@router.post(
    "/repository/index",
    summary="Model repository index (Triton's model repository extension)",
    responses=V2_ERROR_RESPONSES,
    dependencies=[Depends(require_api_key)],
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/RepositoryIndexRequest"}
                }
            },
        }
    },
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    """The models this server serves (one), so tools can discover its name and version."""
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes, empty=True)
    body = parse_json(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise BadRequest("the repository index request must be a JSON object")
    only_ready = body.get("ready")
    if only_ready is None:
        only_ready = False
    if not isinstance(only_ready, bool):
        raise BadRequest("'ready' must be true or false")
    scorer: Scorer | None = request.app.state.models.scorer
    if scorer is None or (only_ready and not scorer.ready):
        return []
    state = "READY" if scorer.ready else "LOADING"
    return [{"name": scorer.manifest.name, "version": scorer.version, "state": state, "reason": ""}]
