"""What both protocol adapters share: dependencies, body reading, the JSON response class, error
responses."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service import metrics, values
from service.errors import (
    ClientClosed,
    InvalidJSON,
    InvalidRecords,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.microbatch import MicroBatcher
from service.parser_process import ParserProcess
from service.scoring import Scored, Scorer
from service.settings import Settings
from service.sink import RecordSink

T = TypeVar("T")
log = logging.getLogger("vae_anomaly")


class JSON(JSONResponse):
    """JSON rendered by orjson (numpy-aware, several times faster than the standard library).
    A JSONResponse, so that FastAPI documents a route's response model with it."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(request: Request, message: str, errors: list[dict[str, Any]]) -> dict[str, Any]:
    if request.url.path.startswith("/v2"):  # the protocol's error object, exactly
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors[:5])
        return {"error": f"{message}: {detail}" if detail else message}
    return {"error": message, "errors": errors}


def error_response(request: Request, exc: ServiceError) -> JSON:
    exc.forget()  # nothing of the request (a parsed body, a frame) outlives the answer
    if not isinstance(exc, InvalidRecords) and exc.status_code in (400, 413, 415):
        metrics.INVALID_RECORDS.labels(exc.reason).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    body = error_body(request, exc.message, exc.errors)
    return JSON(body, status_code=exc.status_code, headers=headers)


def unexpected_error(request: Request, exc: Exception) -> JSON:
    log.error("unexpected error", exc_info=exc)
    return JSON(error_body(request, "internal error", []), status_code=500)


# dependencies are async: FastAPI would run plain functions in a worker thread (a hop each)


def current_scorer(request: Request) -> Scorer:
    """The scorer serving now; the request keeps it to the end, even if a new one swaps in."""
    scorer: Scorer | None = request.app.state.models.scorer
    if scorer is None or not scorer.ready:
        raise NotReady("no model is ready yet")
    return scorer


async def get_scorer(request: Request) -> Scorer:
    return current_scorer(request)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


INLINE_RECORDS = 64  # requests this small are rendered on the event loop


async def offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work inline when it is tiny (a thread hop costs more), else in a worker thread."""
    return fn(*args) if size <= INLINE_RECORDS else await run_in_threadpool(fn, *args)


async def score_in(
    state: State,
    scorer: Scorer,
    columns: Any,
    n: int,
    score_type: str | None,
    records: list[Any] | None = None,
    on_loop: bool = True,
) -> Scored:
    """Score through the micro-batcher (small requests: small batches on the event loop,
    larger ones on its thread) or directly in a thread (large ones), then offer the records
    (``records``: the id columns of each, if any) to the sink. (``state``: the app's, for the
    batcher and the sink; gRPC calls come here too, ``on_loop=False``: see MicroBatcher.score.)"""
    batcher: MicroBatcher | None = state.batcher
    if batcher is not None and n < batcher.max_batch:
        scored = await batcher.score(scorer, columns, n, score_type, on_loop)
    else:
        scored = (await run_in_threadpool(metrics.scored, scorer, [(columns, score_type)]))[0]
    if state.sink is not None:
        await offload(n, sink_records, state, scorer, columns, scored, records)
    return scored


def sink_records(
    state: State, scorer: Scorer, columns: Any, scored: Scored, records: list[Any] | None
) -> None:
    """Hand a uniform sample of the scored records, with their verdicts, to the sink."""
    sink: RecordSink = state.sink
    sink.offer(scorer.manifest, columns, scored.is_anomaly, records)


ScorerDep = Annotated[Scorer, Depends(get_scorer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def body_headers(
    request: Request, limit: int, *, binary: bool = False, empty: bool = False
) -> None:
    """Refuse, before reading it, a body that is not plain JSON (415) or declared too large
    (413). One pass over the raw headers: this runs on the hot path.

    Only ``application/json`` is read: a browser page may POST ``text/plain``, a form type
    or no type at all cross-origin without a CORS preflight; curl's ``-d`` sends a form type.
    Where ``binary`` tensors are read (V2 infer), a request that carries the binary extension's
    header may have any type: a custom header always takes a preflight. Where ``empty``, a
    request with no body may come without a type (there is nothing to read).
    """
    ctype = encoding = declared = tensor_header = None
    for k, v in request.scope["headers"]:
        if k == b"content-type":
            ctype = v
        elif k == b"content-length":
            declared = v
        elif k == b"content-encoding":
            encoding = v
        elif k == b"inference-header-content-length":
            tensor_header = v
    exempt = (binary and tensor_header is not None) or (
        empty and ctype is None and declared in (None, b"0")
    )
    if (
        not exempt
        and ctype != b"application/json"
        and (ctype is None or not JSON_TYPE.match(ctype))
    ):
        given = ctype.decode("latin-1")[:80] if ctype is not None else "none"
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {given}")
    if encoding is not None and encoding.strip().lower() != b"identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding.decode('latin-1')[:40]} is not supported: "
            "send the JSON uncompressed"
        )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {int(declared)} bytes is over the {limit}-byte limit"
        )


JSON_TYPE = re.compile(rb"[ \t]*application/json[ \t]*(;|\Z)", re.IGNORECASE)
GZIP_MAGIC = b"\x1f\x8b"


async def read_body(
    request: Request, limit: int, *, binary: bool = False, empty: bool = False
) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) or not JSON (415; see
    :func:`body_headers` for ``binary`` and ``empty``)."""
    body_headers(request, limit, binary=binary, empty=empty)
    chunks, size = [], 0
    receive = request.receive  # the ASGI channel itself: Request.stream() costs more per call
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed("the client closed the connection before sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if body.startswith(GZIP_MAGIC):
        raise UnsupportedMediaType("the body is gzip-compressed: send the JSON uncompressed")
    return body


def parse_json(body: bytes) -> Any:
    """``body`` as JSON (:func:`service.values.json_loads`: ``NaN`` and huge numbers parse, to
    be refused per field with a clear reason), or InvalidJSON (400)."""
    try:
        return values.json_loads(body)
    except ValueError as e:
        raise InvalidJSON(f"request body is not valid JSON: {e}") from None


INLINE_BYTES = 64 * 1024  # bodies this small are parsed and validated on the event loop


async def parse_body(request: Request, body: bytes, fn: Callable[..., T], *args: Any) -> T:
    """``fn(JSON of body, *args)``: on the event loop for a small body, else in the parser
    process (see service.parser_process)."""
    if len(body) <= INLINE_BYTES:
        return fn(parse_json(body), *args)
    parser: ParserProcess = request.app.state.parser
    return await parser.run(parsed_with, fn, body, *args)


def parsed_with(fn: Callable[..., T], body: bytes, *args: Any) -> T:
    return fn(parse_json(body), *args)
