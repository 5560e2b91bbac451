"""The Open Inference Protocol over gRPC (``--grpc-port``; needs the ``grpc`` extra).

KServe's V2 gRPC API (ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata,
ModelInfer, with ``contents`` or ``raw_input_contents``), served by a ``grpc.aio`` server on the
same event loop as the HTTP app, started and stopped in the app's lifespan. A call shares
everything with REST: the model, the V2 parser (each request is turned into the JSON request it
stands for), the micro-batcher, the API keys (``authorization: Bearer <key>`` or ``x-api-key``
metadata), the limits (a message over the body limit is refused by gRPC itself, the request
timeout is the call's deadline) and the metrics (route: the gRPC method). Outputs go back as
``raw_output_contents``, as Triton sends them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from starlette.datastructures import State

from service import __version__, logs, metrics, v2, v2_binary
from service.auth import check_key
from service.errors import BadRequest, NotReady, ServiceError
from service.middleware import new_request_id
from service.proto import predict_v2_pb2 as pb
from service.scoring import Scorer
from service.settings import Settings

log = logging.getLogger("vae_anomaly")
SERVICE = "/inference.GRPCInferenceService/"
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}
CONTENTS = {  # datatype -> the InferTensorContents field holding it
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _data(t: Any, raw: bytes | None) -> Any:
    """An input tensor's elements, from its raw bytes or its typed contents."""
    if raw is not None:
        count = v2_binary.element_count(t.name, list(t.shape))
        return v2_binary.decode_tensor(t.name, t.datatype, raw, count)
    field = CONTENTS.get(t.datatype)
    if field is None:  # FP16 has no typed field: raw contents only
        raise BadRequest(f"input {t.name!r}: datatype {t.datatype!r} needs raw_input_contents")
    values = getattr(t.contents, field)
    if field != "bytes_contents":
        return list(values)
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise BadRequest(f"input {t.name!r}: a BYTES element is not UTF-8 text") from None


def request_json(req: pb.ModelInferRequest) -> tuple[dict[str, Any], int]:
    """The JSON inference request a gRPC one stands for (parsed by the REST path's parser),
    and the number of values in it."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    inputs = []
    size = 0
    for i, t in enumerate(req.inputs):
        if raw and t.HasField("contents"):
            raise BadRequest(f"input {t.name!r}: both contents and raw_input_contents")
        data = _data(t, raw[i] if raw else None)
        size += len(data)
        tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": data}
        if t.parameters:
            tensor["parameters"] = {k: _param(v) for k, v in t.parameters.items()}
        inputs.append(tensor)
    body: dict[str, Any] = {"inputs": inputs}
    if req.id:
        body["id"] = req.id
    if req.parameters:
        body["parameters"] = {k: _param(v) for k, v in req.parameters.items()}
    if req.outputs:
        body["outputs"] = [{"name": o.name} for o in req.outputs]
    return body, size


def response_message(out: dict[str, Any], arrays: dict[str, Any]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(
        model_name=out["model_name"], model_version=out["model_version"], id=out.get("id", "")
    )
    resp.parameters["score_type"].string_param = out["parameters"]["score_type"]
    resp.parameters["threshold"].double_param = out["parameters"]["threshold"]
    for o in out["outputs"]:
        resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        resp.raw_output_contents.append(v2_binary.encode(o["datatype"], arrays[o["name"]]))
    return resp


class InferenceService:
    """The V2 gRPC API over the app's state (model, batcher, keys, settings)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings: Settings = state.settings

    def _scorer(self) -> Scorer:
        scorer: Scorer | None = self.state.models.scorer
        if scorer is None or not scorer.ready:
            raise NotReady("no model is ready yet")
        return scorer

    def _model(self, name: str, version: str) -> Scorer:
        scorer = self._scorer()
        v2.check_model(scorer, name, version or None)
        return scorer

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        scorer = self.state.models.scorer
        return pb.ServerReadyResponse(ready=scorer is not None and scorer.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="vae-anomaly", version=__version__, extensions=v2.EXTENSIONS
        )

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except (NotReady, ServiceError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        self._check_key(context)
        meta = v2.metadata(self._model(request.name, request.version))
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]],
            outputs=[tensors(**t) for t in meta["outputs"]],
        )

    def _check_key(self, context: Any) -> None:
        keys = self.state.api_keys
        if keys is not None:  # else open: the call's metadata is not even read
            check_key(keys, dict(context.invocation_metadata() or ()))

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        self._check_key(context)
        scorer = self._model(request.model_name, request.model_version)
        body, size = request_json(request)
        out, arrays = await v2.run_infer(self.state, scorer, self.settings, body, size)
        return response_message(out, arrays)


Handler = Callable[[Any, Any], Awaitable[Any]]


def observed(name: str, handler: Handler, timeout: float) -> Handler:
    """``handler`` with what every HTTP request gets: the request timeout, metrics (method
    POST, route ``/inference.GRPCInferenceService/<name>``, the HTTP-equivalent status), a
    request id and a log line; errors become gRPC status codes with the same messages."""
    route = SERVICE + name

    async def call(request: Any, context: Any) -> Any:
        token = logs.request_id.set(new_request_id())
        status, start = 200, time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                return await handler(request, context)
        except ServiceError as e:
            status = e.status_code
            if e.status_code in (400, 413):
                metrics.INVALID_RECORDS.labels(e.reason).inc()
            await context.abort(CODES.get(e.status_code, grpc.StatusCode.UNKNOWN), e.message)
        except TimeoutError:
            status = 503
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the request took over {timeout:g} s"
            )
        except (asyncio.CancelledError, aio.AbortError):
            status = 499
            raise
        except Exception as e:
            status = 500
            log.error("unexpected error", exc_info=e)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            elapsed = time.perf_counter() - start
            metrics.request_done("POST", route, status, elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "method": "POST",
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            logs.request_id.reset(token)

    return call


async def start(state: State, settings: Settings) -> aio.Server:
    """Start the gRPC server on ``settings.grpc_port`` (in the running event loop)."""
    service = InferenceService(state)
    # generic handlers from the message classes: no generated service stubs are needed
    handlers = {}
    rpc = grpc.unary_unary_rpc_method_handler
    for name, (req, resp) in RPCS.items():
        handler = observed(name, getattr(service, name), settings.request_timeout)
        handlers[name] = rpc(
            handler, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
    limit = settings.max_body_bytes
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            # several workers share the port (the kernel spreads connections over them), as
            # uvicorn's workers share the HTTP socket; one worker gets a clear error if taken
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)]
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("grpc listening", extra={"address": address})
    return server


RPCS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}
