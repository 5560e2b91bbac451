"""Structured logs: one JSON object per line, with the request id of the request being served."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# attributes every LogRecord has; anything else was passed as extra= and is logged as a field
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "color_message",
}


class JSONFormatter(logging.Formatter):
    """A JSON object per record (orjson: a log line per request must cost little)."""

    _second = -1
    _stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # e.g. an integer beyond 64 bits
            return json.dumps(out, default=str)


_handler: logging.StreamHandler[TextIO] | None = None  # setup()'s, once it has run


def setup(level: str = "info") -> None:
    """Send every logger (ours and uvicorn's) to stderr as JSON lines."""
    global _handler
    handler = _handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # we log each request ourselves


def info_line(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra=fields)``, the same line, for the hot path (a line per request):
    written straight to setup()'s stream, without the LogRecord and the handler chain, which
    cost several times the line itself. Through logging when it is configured otherwise."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _handler
    if handler is None or logger.handlers or logging.root.handlers != [handler]:
        logger.info(msg, extra=fields)
        return
    out: dict[str, Any] = {
        "ts": handler.formatter.stamp(time.time()),  # type: ignore[union-attr]
        "level": "info",
        "logger": logger.name,
        "msg": msg,
    }
    rid = request_id.get()
    if rid:
        out["request_id"] = rid
    out.update(fields)
    line = orjson.dumps(out, default=str).decode() + handler.terminator
    with handler.lock:  # type: ignore[union-attr]
        handler.stream.write(line)
        handler.stream.flush()
