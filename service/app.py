"""The HTTP application: ``create_app(settings)`` wires the model, the routes and observability."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, admin, logs, metrics, native, v2
from service.batching import MicroBatcher
from service.errors import InvalidRecords, ServiceError
from service.http import JSON
from service.lifecycle import ModelManager
from service.scoring import Scorer
from service.settings import Settings, load_settings
from service.sink import NormalSink

log = logging.getLogger("vae_anomaly")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Observe:
    """Request id (from ``X-Request-ID`` or new, echoed back), metrics by route template, and
    one structured log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.HTTP_DURATION.labels(route).observe(elapsed)
            if route not in ("/metrics", "/healthz", "/readyz"):
                log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            logs.request_id.reset(token)


def _error_body(request: Request, message: str, errors: list[dict[str, Any]]) -> dict[str, Any]:
    if request.url.path.startswith("/v2"):  # the protocol's error object, exactly
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors[:5])
        return {"error": f"{message}: {detail}" if detail else message}
    return {"error": message, "errors": errors}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSON:
        if not isinstance(exc, InvalidRecords) and exc.status_code in (400, 413):
            metrics.INVALID_RECORDS.labels(exc.reason).inc()
        return JSON(_error_body(request, exc.message, exc.errors), status_code=exc.status_code)

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
        return JSON(_error_body(request, str(exc.detail), []), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSON:
        log.exception("unexpected error")
        return JSON(_error_body(request, "internal error", []), status_code=500)


def install_openapi(app: FastAPI) -> None:
    """Put the served model's request schema (real fields, types, categories) into /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        scorer: Scorer | None = app.state.models.scorer
        if scorer is not None:
            req = native.request_model(scorer.manifest, app.state.settings.max_records)
            js = req.model_json_schema(ref_template="#/components/schemas/{model}")
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps.update(js.pop("$defs", {}))
            comps["ScoreRequest"] = js
            schema["paths"]["/v1/score"]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``; the model is loaded and warmed up at start-up."""

    def on_swap(scorer: Scorer) -> None:
        app.openapi_schema = None  # the request schema follows the model

    models = ModelManager(settings, on_swap=on_swap)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await models.start()
        watcher = asyncio.create_task(models.watch()) if models.registry else None
        if settings.batch_max_records > 0:
            app.state.batcher = MicroBatcher(
                settings.batch_max_records, settings.batch_max_wait_ms / 1000
            )
            app.state.batcher.start()
        if settings.sink_dir is not None:
            app.state.sink = NormalSink(
                settings.sink_dir, settings.sink_max_bytes, settings.sink_keep_files
            )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if app.state.batcher is not None:
                await app.state.batcher.stop()
            if app.state.sink is not None:
                app.state.sink.close()

    app = FastAPI(
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
    app.state.admin_token = settings.admin_secret()
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(native.router)
    app.include_router(v2.router)
    app.include_router(admin.router)

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="A model is loaded and answered a warm-up call")
    async def readyz() -> JSON:
        scorer: Scorer | None = models.scorer
        if scorer is None or not scorer.ready:
            return JSON({"status": "not ready"}, status_code=503)
        return JSON({"status": "ready", "model": scorer.manifest.name, "version": scorer.version})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    app.add_middleware(Observe)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the settings come from VAE_ANOMALY_* variables."""
    settings = load_settings()
    logs.setup(settings.log_level)
    return create_app(settings)
