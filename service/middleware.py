"""What every HTTP request goes through, in one place: :class:`HttpMiddleware` (request id,
timeout, metrics by route template, the access log line) and, at the bottom of the stack,
:class:`FastRoutes` (the hot routes straight to their endpoints, the rest to FastAPI's router).

The stack, built by :meth:`service.app.ServiceApp.build_middleware_stack`::

    HttpMiddleware -> middleware added with app.add_middleware -> FastRoutes
        -> FastAPI's own (errors, exception handlers) -> router

so whatever middleware is added sees the hot path too; once the app has started, Starlette
refuses to add more.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics, native, v2
from service.errors import ServiceError, Timeout
from service.http import error_response, unexpected_error

log = logging.getLogger("vae_anomaly")
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
V2_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer\Z")
QUIET_ROUTES = ("/metrics", "/healthz", "/readyz")  # polled: no access log line

_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process and start (a random prefix and a counter): a syscall for fresh
    randomness on every request costs more than the rest of the request id handling."""
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


class HttpMiddleware:
    """A request id (from ``X-Request-ID`` or new, echoed back and put in every log line),
    the request timeout, metrics by route template and one structured log line."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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

        try:
            async with asyncio.timeout(self.timeout):
                await self.app(scope, receive, send_with_id)
        except TimeoutError:
            if status == 0:
                exc = Timeout(f"the request took over {self.timeout:g} s")
                await error_response(Request(scope, receive), exc)(scope, receive, send_with_id)
            else:  # the response had started: all we can do is stop
                log.warning("request timed out while answering")
        finally:
            done(scope, status or 500, time.perf_counter() - start)
            logs.request_id.reset(token)


def done(scope: Scope, status: int, elapsed: float) -> None:
    """Count and log one request, by its route's template (``unmatched`` when none matched)."""
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    metrics.request_done(scope["method"], route, status, elapsed)
    if route not in QUIET_ROUTES:
        ms = round(elapsed * 1000, 3)
        fields = {"method": scope["method"], "route": route, "status": status, "duration_ms": ms}
        logs.info_line(log, "request", fields)


Endpoint = Callable[[Request], Awaitable[Response]]


def post_route(router: APIRouter, path: str) -> APIRoute:
    """The route of ``POST path`` in ``router``."""
    for r in router.routes:
        if isinstance(r, APIRoute) and r.path == path and "POST" in (r.methods or ()):
            return r
    raise LookupError(f"no route POST {path}")


class FastRoutes:
    """``POST /v1/score`` and V2 ``POST /v2/models/{name}[/versions/{version}]/infer`` straight
    to their endpoints; everything else to ``app`` (FastAPI's stack and router).

    Single-record requests are the hot path, and routing, FastAPI's error middleware and
    dependency injection would cost more than the scoring itself. The endpoints are still
    FastAPI's routes (for /docs and the schema; the route is put in the scope as the router
    would, for the metrics' label) and take only the request; their errors are rendered by
    the same functions as everywhere else.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.score = post_route(native.router, "/v1/score")
        self.infer = (
            post_route(v2.router, "/v2/models/{name}/infer"),
            post_route(v2.router, "/v2/models/{name}/versions/{version}/infer"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/v1/score":
                await self.direct(self.score, scope, receive, send)
                return
            if m := V2_INFER.match(path):
                route = self.infer[m[2] is not None]
                params = {"name": m[1]} if m[2] is None else {"name": m[1], "version": m[2]}
                scope["path_params"] = params
                await self.direct(route, scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def direct(route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        request = Request(scope, receive)
        endpoint: Endpoint = route.endpoint
        response: Any
        try:
            response = await endpoint(request)
        except ServiceError as exc:
            response = error_response(request, exc)
        except Exception as exc:
            response = unexpected_error(request, exc)
        await response(scope, receive, send)
