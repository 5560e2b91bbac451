"""The HTTP application: ``create_app(settings)`` wires the model, the routes and observability."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from service import __version__, admin, explorer, logs, metrics, native, v2
from service.auth import Secrets, require_api_key, require_metadata_key
from service.errors import InvalidRecords, ServiceError, Timeout
from service.http import JSON
from service.lifecycle import ModelManager
from service.microbatch import MicroBatcher
from service.parser_process import ParserProcess
from service.scoring import Scorer
from service.settings import Settings, load_settings
from service.sink import RecordSink

log = logging.getLogger("vae_anomaly")
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
V2_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer\Z")
V2_INFER_ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process and start (a random prefix and a counter): a syscall for fresh
    randomness on every request costs more than the rest of the request id handling."""
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


class ServiceApp(FastAPI):
    """FastAPI, plus what every HTTP request goes through first: a request id (from
    ``X-Request-ID`` or new, echoed back), the request timeout, metrics by route template and
    one structured log line.

    ``POST /v1/score`` and V2 ``POST /v2/models/{name}[/versions/{version}]/infer`` are
    dispatched here straight to their endpoints: single-record requests are the hot path, and
    FastAPI's routing, middleware and dependency injection would cost more than the scoring
    itself. The endpoints are still FastAPI's routes (for /docs and the schema) and take only
    the request; errors are rendered by the same functions as everywhere else.
    """

    hot: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]
    request_timeout: float

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        given = b""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                given = v
        rid = given.decode("latin-1") if given and REQUEST_ID.match(given) else new_request_id()
        token = logs.request_id.set(rid)
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        path = scope["path"]
        endpoint = self.hot.get((scope["method"], path))
        route = path if endpoint is not None else None
        if endpoint is None and scope["method"] == "POST" and (m := V2_INFER.match(path)):
            endpoint = v2.infer
            scope["path_params"] = (
                {"name": m[1]} if m[2] is None else {"name": m[1], "version": m[2]}
            )
            route = V2_INFER_ROUTES[m[2] is not None]
        try:
            async with asyncio.timeout(self.request_timeout):
                if endpoint is not None:
                    await self._direct(endpoint, scope, receive, send_with_id)
                else:
                    await super().__call__(scope, receive, send_with_id)
        except TimeoutError:
            if status == 0:
                exc = Timeout(f"the request took over {self.request_timeout:g} s")
                request = Request(scope, receive)
                await error_response(request, exc)(scope, receive, send_with_id)
            else:  # the response had started: all we can do is stop
                log.warning("request timed out while answering")
        finally:
            elapsed = time.perf_counter() - start
            if route is None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.request_done(scope["method"], route, status or 500, elapsed)
            if route not in QUIET_ROUTES and log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status or 500,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            logs.request_id.reset(token)

    async def _direct(
        self,
        endpoint: Callable[[Request], Awaitable[Response]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except ServiceError as exc:
            response = error_response(request, exc)
        except Exception as exc:
            response = unexpected_error(request, exc)
        await response(scope, receive, send)


QUIET_ROUTES = ("/metrics", "/healthz", "/readyz")


def _error_body(request: Request, message: str, errors: list[dict[str, Any]]) -> dict[str, Any]:
    if request.url.path.startswith("/v2"):  # the protocol's error object, exactly
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors[:5])
        return {"error": f"{message}: {detail}" if detail else message}
    return {"error": message, "errors": errors}


def error_response(request: Request, exc: ServiceError) -> JSON:
    exc.forget()  # nothing of the request (a parsed body, a frame) outlives the answer
    if not isinstance(exc, InvalidRecords) and exc.status_code in (400, 413, 415):
        metrics.INVALID_RECORDS.labels(exc.reason).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    body = _error_body(request, exc.message, exc.errors)
    return JSON(body, status_code=exc.status_code, headers=headers)


def unexpected_error(request: Request, exc: Exception) -> JSON:
    log.error("unexpected error", exc_info=exc)
    return JSON(_error_body(request, "internal error", []), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSON:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSON:
        errors = [
            {
                "record": None,
                "field": ".".join(str(p) for p in e["loc"][1:]) or None,
                "reason": e["type"],
                "message": e["msg"],
            }
            for e in exc.errors()
        ]
        return JSON(_error_body(request, "invalid request parameters", errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSON:
        body = _error_body(request, str(exc.detail), [])
        return JSON(body, status_code=exc.status_code, headers=exc.headers)  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSON:
        return unexpected_error(request, exc)


def install_openapi(app: FastAPI) -> None:
    """/openapi.json describes the service as it runs: the served model's request schema (real
    fields, types, categories, limits), the V2 inference request, and the credentials each
    operation needs (the admin token; API keys when configured)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        settings: Settings = app.state.settings
        comps = schema.setdefault("components", {})
        models = comps.setdefault("schemas", {})
        scorer: Scorer | None = app.state.models.scorer
        bodies: dict[str, type[BaseModel]] = {
            "InferenceRequest": v2.InferenceRequest,
            "RepositoryIndexRequest": v2.RepositoryIndexRequest,
        }
        if scorer is not None:
            bodies["ScoreRequest"] = native.request_model(
                scorer.manifest, settings.max_records, settings.max_string_length
            )
            schema["paths"]["/v1/score"]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}
                },
            }
            explorer.document(schema, scorer, settings.max_records)
        for name, model in bodies.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(js.pop("$defs", {}))
            models[name] = js
        schemes = comps.setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        if app.state.api_keys is not None:
            schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        for path, ops in schema["paths"].items():
            for op in ops.values():
                if path.startswith("/v1/admin/"):
                    op["security"] = [{"bearer": []}]
                elif app.state.api_keys is not None and "401" in op.get("responses", {}):
                    op["security"] = [{"bearer": []}, {"apiKey": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_keyed_docs(app: FastAPI) -> None:
    """/openapi.json and /docs behind an API key (``protect_metadata``): the schema shows each
    feature's training range and categories."""
    keyed: dict[str, Any] = {"include_in_schema": False, "dependencies": [Depends(require_api_key)]}

    @app.get("/openapi.json", **keyed)
    async def openapi_json() -> JSON:
        return JSON(app.openapi())

    @app.get("/docs", **keyed)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")


def tune_gc() -> None:
    """After start-up: move what is loaded so far (libraries, the first model) out of the
    cyclic collector's sight, and collect less often. Requests make many short-lived objects;
    with the defaults, collections scanning everything cost about a fifth of a single-record
    request. Cycles are still collected; objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def create_app(settings: Settings) -> ServiceApp:
    """The app for ``settings``; the model is loaded and warmed up at start-up."""

    def on_swap(scorer: Scorer) -> None:
        app.openapi_schema = None  # the request schema follows the model

    models = ModelManager(settings, on_swap=on_swap)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await models.start()
        app.state.parser = ParserProcess()
        await app.state.parser.warm_up()  # ready means ready for big bodies too
        tune_gc()
        watcher = asyncio.create_task(models.watch()) if models.registry else None
        if settings.batch_max_records > 0:
            app.state.batcher = MicroBatcher(
                settings.batch_max_records, settings.batch_max_wait_ms / 1000
            )
            app.state.batcher.start()
        if settings.sink_dir is not None:
            app.state.sink = RecordSink(
                settings.sink_dir,
                settings.sink_max_bytes,
                settings.sink_keep_files,
                settings.sink_sample,
            )
        grpc_server = None
        if settings.grpc_port is not None:
            from service import grpc_v2  # the grpc extra: imported only when asked for

            grpc_server = await grpc_v2.start(app.state, settings)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            app.state.parser.close()
            if watcher is not None:
                watcher.cancel()
            if app.state.batcher is not None:
                await app.state.batcher.stop()
            if app.state.sink is not None:
                app.state.sink.close()

    closed = settings.protect_metadata  # then the documentation routes are added with a key check
    app = ServiceApp(
        openapi_url=None if closed else "/openapi.json",
        docs_url=None if closed else "/docs",
        redoc_url=None if closed else "/redoc",
        title="vae-anomaly",
        version=__version__,
        lifespan=lifespan,
        description="Anomaly scores for tabular records from a variational "
        "autoencoder. Higher score = more anomalous.",
    )
    app.state.settings = settings
    app.state.models = models
    app.state.sink = None
    app.state.batcher = None
    admin_token = settings.admin_secret()
    app.state.admin_token = Secrets([admin_token]) if admin_token else None
    api_keys = settings.api_key_list()
    app.state.api_keys = Secrets(api_keys) if api_keys else None
    app.request_timeout = settings.request_timeout
    app.hot = {("POST", "/v1/score"): native.score_records}
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(native.router)
    app.include_router(v2.router)
    app.include_router(admin.router)
    app.include_router(explorer.router)

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="A model is loaded and answered a warm-up call")
    async def readyz() -> JSON:
        scorer: Scorer | None = models.scorer
        loading = models.loading()  # a load that takes long shows here (stuck: given up)
        if scorer is None or not scorer.ready:
            return JSON({"status": "not ready", "loading": loading}, status_code=503)
        return JSON(
            {
                "status": "ready",
                "model": scorer.manifest.name,
                "version": scorer.version,
                "loading": loading,
            }
        )

    if closed:
        install_keyed_docs(app)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        dependencies=[Depends(require_metadata_key)],
    )
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the settings come from VAE_ANOMALY_* variables."""
    settings = load_settings()
    logs.setup(settings.log_level)
    return create_app(settings)
