"""The HTTP application: ``create_app(settings)`` wires the model, the routes and observability."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__, admin, explorer, logs, metrics, native, openapi, v2
from service.auth import Secrets, require_metadata_key
from service.errors import ServiceError
from service.http import JSON, error_body, error_response, unexpected_error
from service.lifecycle import ModelManager
from service.microbatch import MicroBatcher
from service.middleware import FastRoutes, HttpMiddleware
from service.parser_process import ParserProcess
from service.scoring import Scorer
from service.settings import Settings, load_settings
from service.sink import RecordSink


class ServiceApp(FastAPI):
    """FastAPI, with its middleware stack built around :class:`FastRoutes` (the hot routes,
    then FastAPI's own stack and router) and inside :class:`HttpMiddleware`, so that nothing
    reaches an endpoint without going through every middleware (service/middleware.py)."""

    request_timeout: float

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # straight into the stack, as Starlette does: FastAPI's own __call__ first looks for an
        # OpenTelemetry provider on every request (environment lookups), which costs a tenth of
        # a single-record request, and the service configures none
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        # FastAPI's stack without the added middleware, which goes above FastRoutes instead
        added, self.user_middleware = self.user_middleware, []
        try:
            app: ASGIApp = FastRoutes(super().build_middleware_stack())
        finally:
            self.user_middleware = added
        for cls, args, kwargs in reversed(added):
            app = cls(app, *args, **kwargs)
        return HttpMiddleware(app, self.request_timeout)


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
        return JSON(error_body(request, "invalid request parameters", errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSON:
        body = error_body(request, str(exc.detail), [])
        return JSON(body, status_code=exc.status_code, headers=exc.headers)  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSON:
        return unexpected_error(request, exc)


def tune_gc() -> None:
    """After start-up: move what is loaded so far (libraries, the first model) out of the
    cyclic collector's sight, and collect less often. Requests make many short-lived objects;
    with the defaults, collections scanning everything cost about a fifth of a single-record
    request. Cycles are still collected; objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up (the model, the parser process, the micro-batcher, the sink, gRPC) and
    shutdown, in reverse."""
    settings: Settings = app.state.settings
    models: ModelManager = app.state.models
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


health = APIRouter(tags=["health"])


@health.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", summary="A model is loaded and answered a warm-up call")
async def readyz(request: Request) -> JSON:
    models: ModelManager = request.app.state.models
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


@health.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_metadata_key)],
)
async def prometheus_metrics() -> Response:
    body, ctype = metrics.exposition()
    return Response(body, media_type=ctype)


def create_app(settings: Settings) -> ServiceApp:
    """The app for ``settings``; the model is loaded and warmed up at start-up."""

    def on_swap(scorer: Scorer) -> None:
        app.openapi_schema = None  # the request schema follows the model

    app = ServiceApp(
        openapi_url=None,  # the documentation routes are service/openapi.py's
        docs_url=None,
        redoc_url=None,
        title="vae-anomaly",
        version=__version__,
        lifespan=lifespan,
        description="Anomaly scores for tabular records from a variational "
        "autoencoder. Higher score = more anomalous.",
    )
    app.state.settings = settings
    app.state.models = ModelManager(settings, on_swap=on_swap)
    app.state.sink = None
    app.state.batcher = None
    admin_token = settings.admin_secret()
    app.state.admin_token = Secrets([admin_token]) if admin_token else None
    api_keys = settings.api_key_list()
    app.state.api_keys = Secrets(api_keys) if api_keys else None
    app.request_timeout = settings.request_timeout
    install_error_handlers(app)
    openapi.install_openapi(app)
    openapi.install_docs(app, keyed=settings.protect_metadata)
    # the routes, one router per module: add a module's router here
    app.include_router(native.router)
    app.include_router(v2.router)
    app.include_router(admin.router)
    app.include_router(explorer.router)
    app.include_router(health)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the settings come from VAE_ANOMALY_* variables."""
    settings = load_settings()
    logs.setup(settings.log_level)
    return create_app(settings)
