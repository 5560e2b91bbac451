"""The Open Inference Protocol over gRPC (``--grpc-port``; needs the ``grpc`` extra).

KServe's V2 gRPC API (ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata,
ModelInfer, with ``contents`` or ``raw_input_contents``), served by a ``grpc.aio`` server on the
same event loop as the HTTP app, started and stopped in the app's lifespan. A call shares
everything with REST: the model, the V2 parser (each request is read, from its bytes, into the
JSON request it stands for: service/grpc_wire.py), the micro-batcher, the API keys
(``authorization: Bearer <key>`` or ``x-api-key`` metadata), the limits (a message over the
body limit is refused by gRPC itself, the request timeout is the call's deadline) and the
metrics (route: the gRPC method). Outputs go back as ``raw_output_contents``, as Triton sends
them; the values the model never saw are named in the response's
``parameters["unusual_values"]`` (a JSON string, as REST lists them).

grpc.aio hands the loop one call per round trip of its completion queue, so calls sent together
reach the micro-batcher a few loop turns apart: the batcher waits for them (service/microbatch.py,
``FILL_SECONDS``) and scores their batch on its thread (``on_loop=False``: see
``MicroBatcher.score``). The loop's own work per call (grpcio's, then reading, validating and
answering the call) is what limits the calls per second: docs/performance.md.
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

from service import __version__, grpc_wire, logs, metrics, v2
from service.auth import check_key
from service.errors import NotReady, ServiceError
from service.http import INLINE_BYTES
from service.middleware import new_request_id
from service.parser_process import ParserProcess
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

    async def ModelInfer(self, request: bytes, context: Any) -> bytes:
        """Bytes in, bytes out (service/grpc_wire.py: no protobuf messages on the hot path)."""
        self._check_key(context)
        most = self.settings.max_records
        req = grpc_wire.scan(request)
        if req is None and len(request) > INLINE_BYTES:
            # protobuf must read it, holding the GIL throughout (typed contents: an object per
            # element; 16 MB: ~0.15 s the loop would stand still), so the parser process does,
            # as for big REST bodies
            parser: ParserProcess = self.state.parser
            name, version, parts = await parser.run(grpc_wire.read_parts, request, most)
            scorer = self._model(name, version)
        else:
            req = req or grpc_wire.decoded(request)  # (scanned already)
            scorer = self._model(req.model_name, req.model_version)
            parts = req.parts(most)
        out, arrays = await v2.run_infer(self.state, scorer, self.settings, *parts)
        return grpc_wire.response(out, arrays)


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
            ms = round(elapsed * 1000, 3)
            fields = {"method": "POST", "route": route, "status": status, "duration_ms": ms}
            logs.info_line(log, "request", fields)  # REST's line, as cheaply
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
        if req is None:  # bytes as they come and go
            handlers[name] = rpc(handler)
            continue
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
    "ModelInfer": (None, None),  # read and written by service/grpc_wire.py
}
