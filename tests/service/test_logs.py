"""The request log line written on the hot path (service/logs.py ``info_line``) is the line
``logging`` would write, and goes through ``logging`` when logging is configured otherwise."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest

from service import logs

FIELDS = {"method": "POST", "route": "/v2/models/{name}/infer", "status": 400, "duration_ms": 0.25}


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What logs.setup()'s handler writes (to the captured stderr); the logging configuration
    given back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._handler
    try:
        yield lambda: capsys.readouterr().err
    finally:
        root.handlers[:], level, logs._handler = saved
        root.setLevel(level)


def test_the_hot_line_is_the_line_logging_writes(stderr: Callable[[], str]) -> None:
    logs.setup("info")
    log = logging.getLogger("vae_anomaly")
    token = logs.request_id.set("req-7")
    try:
        log.info("request", extra=FIELDS)
        logs.info_line(log, "request", FIELDS)
    finally:
        logs.request_id.reset(token)
    by_logging, hot = (json.loads(line) for line in stderr().splitlines())
    assert by_logging.pop("ts")[:16] == hot.pop("ts")[:16]  # the same minute
    assert list(hot.items()) == list(by_logging.items())  # same fields, same order
    assert hot["request_id"] == "req-7" and hot["status"] == 400


def test_nothing_below_the_level_and_logging_when_configured_otherwise(
    stderr: Callable[[], str],
) -> None:
    logs.setup("warning")
    log = logging.getLogger("vae_anomaly")
    logs.info_line(log, "request", FIELDS)
    assert stderr() == ""
    logs.setup("info")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Keep())  # someone else's handler: records must reach it
    logs.info_line(log, "request", FIELDS)
    assert [(r.getMessage(), r.status) for r in seen] == [("request", 400)]  # type: ignore[attr-defined]
    assert json.loads(stderr())["route"] == FIELDS["route"]
