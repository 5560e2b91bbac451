"""What a connection may hold: uvicorn's httptools protocol with limits of its own.

uvicorn has no limit on the request head and no timeout for reading it: a silent connection
stays open for ever, a 100 MB header is read (and joined in quadratic time) on the event loop,
and once the process is out of file descriptors new clients fail at TCP level. Here:

- the request head (request line and headers) must arrive within ``header_timeout`` seconds,
  on a new connection and between requests on a kept-alive one, else the connection is closed
  (408 if part of a head came);
- it may be at most ``max_header_bytes`` long and hold at most ``max_headers`` headers (431);
- at most ``max_connections`` connections per worker (never more than the open-file limit
  allows): a connection over the limit closes the one that has waited longest for a request
  head; if every connection is busy, its request is answered 503.

The limits come from the settings (the environment, as for the app). Body reading is bounded
by the app's request timeout.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings, load_settings

log = logging.getLogger("vae_anomaly")
RESERVED_FILES = 64  # descriptors kept for the model, logs, the registry, the parser process


class Limits:
    def __init__(self, s: Settings) -> None:
        self.header_timeout = s.header_timeout
        self.max_header_bytes = s.max_header_bytes
        self.max_headers = s.max_headers
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = files - RESERVED_FILES if files != resource.RLIM_INFINITY else s.max_connections
        self.max_connections = max(1, min(s.max_connections, room))
        if self.max_connections < s.max_connections:
            log.warning(
                "max_connections lowered to the open-file limit",
                extra={"max_connections": self.max_connections, "open_files": files},
            )


def refusal(status: int, message: str) -> Any:
    """A minimal ASGI app answering ``status`` with a JSON error and closing the connection."""
    body = b'{"error":"' + message.encode() + b'"}'

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


TOO_MANY_HEADERS = refusal(431, "too many request headers")
BUSY = refusal(503, "too many connections: retry later")


class GuardedProtocol(HttpToolsProtocol):
    limits: ClassVar[Limits | None] = None
    # connections waiting for a request head, longest first (dicts keep insertion order)
    waiting: ClassVar[dict[GuardedProtocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if GuardedProtocol.limits is None:
            GuardedProtocol.limits = Limits(load_settings())
        self.lim: Limits = GuardedProtocol.limits
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_bytes = 0
        self.in_head = False  # between the first byte of a request and its last header

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.lim.max_connections:
            for oldest in list(self.waiting):
                if oldest is not self and not oldest.transport.is_closing():
                    oldest._close(None)
                    break

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self.waiting[self] = None
        self.head_timer = self.loop.call_later(self.lim.header_timeout, self._head_timeout)

    def _head_done(self) -> None:
        self.in_head = False
        self.waiting.pop(self, None)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        self._close(408 if self.in_head else None)

    def _close(self, status: int | None) -> None:
        """Close the connection, first answering ``status`` (a request head is unfinished)."""
        self._head_done()
        if self.transport.is_closing():
            return
        if status is not None:
            message = {408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
            self.transport.write(
                f"HTTP/1.1 {status} {message}\r\ncontent-length: 0\r\n"
                "connection: close\r\n\r\n".encode()
            )
        self.transport.close()

    def on_message_begin(self) -> None:
        # (bytes before this, such as the unread rest of a refused body, are no head)
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        # still in the head after this chunk: every byte counted so far was head
        if self.in_head and self.head_bytes > self.lim.max_header_bytes:
            self._close(431)

    def on_headers_complete(self) -> None:
        self._head_done()
        app = self.app
        if len(self.headers) > self.lim.max_headers:
            self.app = TOO_MANY_HEADERS
        elif len(self.connections) > self.lim.max_connections or (
            len(self.tasks) >= self.lim.max_connections
        ):
            self.app = BUSY
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        idle = not self.pipeline
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._await_head()
