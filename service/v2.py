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

import math
from typing import Annotated, Any, Literal, get_args

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import State

from service import __version__, timefeatures, v2_binary, values
from service.auth import check_api_key, require_api_key
from service.bundle import (
    BooleanFeature,
    CategoricalFeature,
    DateTimeColumn,
    Manifest,
    NumericFeature,
    ScoreType,
)
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
    """An inference request: one tensor per feature (validated by :func:`_parse`)."""

    id: Any = Field(None, description="echoed in the response")
    parameters: InferenceParameters | None = None
    inputs: list[InferenceTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _datatype(f: NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn) -> str:
    if isinstance(f, DateTimeColumn):
        return "BYTES" if f.unit == "iso" else "FP64"
    if isinstance(f, NumericFeature):
        return "FP64"
    return "BOOL" if isinstance(f, BooleanFeature) else "BYTES"


def _datatypes(
    f: NumericFeature | BooleanFeature | CategoricalFeature | DateTimeColumn,
) -> set[str]:
    """The datatypes an input may have."""
    return set(NUMERIC_TYPES) if _datatype(f) == "FP64" else {_datatype(f)}


def _inputs(
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
        self.feats: dict[str, Feature] = {f.name: f for f in _inputs(m)}
        self.known = frozenset(self.feats) | frozenset(m.ignored_columns)
        self.columns = [*self.feats, *timefeatures.derived_names(m)]
        self.score_types = frozenset(m.score_types)


_plans: dict[tuple[str, str], _Plan] = {}


def _plan(m: Manifest) -> _Plan:
    key = (m.name, m.version)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 8:  # models come and go (reloads): keep a few
            _plans.clear()
        plan = _plans[key] = _Plan(m)
    return plan


def check_model(scorer: Scorer, name: str, version: str | None) -> None:
    m = scorer.manifest
    if name != m.name:
        raise NotFound(f"unknown model {name!r}; this server serves {m.name!r}")
    if version is not None and version != m.version:
        raise NotFound(f"model {name!r} has no version {version!r}; serving {m.version!r}")


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
    name, dt = f.name, t.get("datatype")
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
    data = _flatten(t.get("data"), len(shape))
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
) -> list[Any] | None:
    """The values of a tensor that is plainly valid (shape ``[N]``, a flat list of N values of
    the feature's usual datatype, exact Python types, no nulls, numbers finite and within the
    datatype's range, strings within the limit); None if it needs :func:`_column`'s closer
    look. A subset of what ``_column`` accepts, with the same values. (Written for speed: this
    runs for every tensor the service scores.)"""
    types = FAST_TYPES[f.kind].get(t.get("datatype"))  # type: ignore[arg-type]
    data, shape = t.get("data"), t.get("shape")
    if (
        types is None
        or type(data) is not list
        or type(shape) is not list
        or len(shape) != 1
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
        "inputs": [{"name": f.name, "datatype": _datatype(f), "shape": [-1]} for f in _inputs(m)],
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


Parsed = tuple[dict[str, list[Any]], int, str | None, list[str], str | None, set[str]]


def _parse(body: Any, m: Manifest, settings: Settings) -> Parsed:
    """Validate an inference request: (columns, records, score type, output names, id, the
    outputs wanted as binary data)."""
    if not isinstance(body, dict):
        raise BadRequest("the inference request must be a JSON object")
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"'id' must be a string, got {type(rid).__name__}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise BadRequest("'inputs' must be a list of tensor objects")
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    plan = _plan(m)
    score_type = params.get("score_type")
    if score_type is not None and score_type not in plan.score_types:
        raise BadRequest(f"parameter score_type must be one of {m.score_types}")
    by_name: dict[str, dict[str, Any]] = {}
    for t in inputs:
        tname = t.get("name")
        if not isinstance(tname, str):
            raise BadRequest("every input needs a string 'name'")
        if tname in by_name:
            raise BadRequest(f"input {tname!r} is given twice")
        by_name[tname] = t
    feats = plan.feats
    if settings.unknown_fields == "reject" and not by_name.keys() <= plan.known:
        unknown = sorted(by_name.keys() - plan.known)
        raise BadRequest(f"unknown input(s) {unknown}; the model's inputs are {sorted(feats)}")
    columns: dict[str, list[Any]] = {}
    for fname, f in feats.items():
        if fname in by_name and isinstance(f, DateTimeColumn):
            columns[fname] = _column(f, by_name[fname], settings.max_string_length)
            try:
                columns.update(timefeatures.derive_column(columns[fname], f))
            except timefeatures.NotADateTime as e:
                raise BadRequest(e.message) from None
        elif fname in by_name and not isinstance(f, DateTimeColumn):
            t, max_len = by_name[fname], settings.max_string_length
            fast = _fast_column(f, t, max_len)
            columns[fname] = fast if fast is not None else _column(f, t, max_len)
        elif not f.nullable:
            raise BadRequest(f"input {fname!r} is required")
    lengths = {len(c) for c in columns.values()}
    if len(lengths) > 1:
        raise BadRequest(f"inputs have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0 or n > settings.max_records:
        raise BadRequest(f"a request holds 1 to {settings.max_records} records, this one {n}")
    if len(columns) < len(plan.columns):
        for fname in plan.columns:
            columns.setdefault(fname, [None] * n)
    wanted = body.get("outputs")
    names = list(OUTPUTS)
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise BadRequest("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in wanted]
        bad = [o for o in names if o not in OUTPUTS]
        if bad:
            raise BadRequest(f"unknown output(s) {bad}; available: {list(OUTPUTS)}")
    return columns, n, score_type, names, rid, v2_binary.binary_outputs(body, names)


def unusual_values(m: Manifest, scored: Scored, columns: dict[str, list[Any]]) -> list[Any]:
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
    header = request.headers.get(v2_binary.HEADER)
    raw = await read_body(request, settings.max_body_bytes, binary=True)
    # the header, not the content type, says a body is binary (clients send either type)
    if header is None:  # JSON: a big body is parsed in the parser process (service/http.py)
        parsed = await parse_body(request, raw, _parse, scorer.manifest, settings)
    else:
        body = await offload(len(raw) >> 10, v2_binary.decode_request, raw, header)
        parsed = await offload(_size(body), _parse, body, scorer.manifest, settings)
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


def _size(body: Any) -> int:
    """Values in a request (to decide where to validate it), without looking inside them."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return 0
    return sum(
        len(t["data"])
        for t in body["inputs"]
        if isinstance(t, dict) and isinstance(t.get("data"), list)
    )


async def run_infer(
    state: State, scorer: Scorer, settings: Settings, body: Any, size: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate and score an inference request given as JSON (gRPC comes here; ``size``: its
    values, when the caller has counted them)."""
    size = _size(body) if size is None else size
    parsed = await offload(size, _parse, body, scorer.manifest, settings)
    return await respond(state, scorer, parsed)


async def respond(
    state: State, scorer: Scorer, parsed: Parsed
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score a validated request (REST, binary REST and gRPC all come here): (the JSON
    response, the output arrays by name)."""
    columns, n, score_type, names, rid, _ = parsed
    scored = await score_in(state, scorer, columns, n, score_type)
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
