"""What both protocol adapters share: dependencies, body reading, the JSON response class."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service.batching import MicroBatcher
from service.errors import ClientClosed, InvalidJSON, NotReady, PayloadTooLarge
from service.scoring import Scored, Scorer
from service.settings import Settings
from service.sink import NormalSink

T = TypeVar("T")


class JSON(JSONResponse):
    """JSON rendered by orjson (numpy-aware, several times faster than the standard library).
    A JSONResponse, so that FastAPI documents a route's response model with it."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


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


INLINE_RECORDS = 64  # requests this small are validated and rendered on the event loop


async def offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work inline when it is tiny (a thread hop costs more), else in a worker thread."""
    return fn(*args) if size <= INLINE_RECORDS else await run_in_threadpool(fn, *args)


async def score(
    request: Request, scorer: Scorer, columns: Any, n: int, score_type: str | None
) -> Scored:
    """:func:`score_in` the request's app."""
    return await score_in(request.app.state, scorer, columns, n, score_type)


async def score_in(
    state: State, scorer: Scorer, columns: Any, n: int, score_type: str | None
) -> Scored:
    """Score through the micro-batcher (small requests) or directly in a thread (large ones),
    then hand normal records to the sink. Never on the event loop. (``state``: the app's, for
    the batcher and the sink; gRPC calls come here too.)"""
    batcher: MicroBatcher | None = state.batcher
    if batcher is not None and n < batcher.max_batch:
        scored = await batcher.score(scorer, columns, n, score_type)
    else:
        scored = await run_in_threadpool(scorer.score, columns, score_type)
    if state.sink is not None:
        await offload(n, sink_records, state, scorer, columns, scored)
    return scored


def sink_records(state: State, scorer: Scorer, columns: Any, scored: Scored) -> None:
    """Hand the records scored as normal to the sink."""
    sink: NormalSink = state.sink
    below = state.settings.sink_max_percentile
    sink.offer(scorer.manifest, columns, scored.is_anomaly, scored.percentile, below)


ScorerDep = Annotated[Scorer, Depends(get_scorer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes (413) or invalid JSON (400)."""
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
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
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """JSON, or InvalidJSON (400). Non-standard ``NaN``/``Infinity`` tokens parse (to be
    refused per field with a clear reason)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        try:
            return json.loads(body)  # accepts NaN / Infinity
        except (ValueError, RecursionError):
            raise InvalidJSON(f"request body is not valid JSON: {e}") from None
