"""The two error bases. :class:`VaeAnomalyError`: a problem the user can fix (a bad file, setting,
bundle or registry, a full disk), which the command line reports in one line with its exit code.
:class:`ServiceError`: an HTTP error carrying its status, which the app turns into a JSON body."""

from __future__ import annotations

import errno
from typing import Any

from pydantic import BaseModel

# a write that failed for want of room: the disk, the user's quota, the file-size limit
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class VaeAnomalyError(Exception):
    """A problem the user can fix, explained by its message. ``vae-anomaly`` prints
    ``error: <message>`` and exits with ``exit_code``; any other exception is a bug and keeps
    its traceback."""

    exit_code = 2


class MissingExtra(VaeAnomalyError):
    """A command whose optional dependencies are not installed."""

    def __init__(self, command: str, extra: str, missing: str | None = None) -> None:
        why = f" (missing {missing})" if missing else ""
        super().__init__(
            f"`{command}` needs more than this install{why}: pip install 'vae-anomaly[{extra}]'"
        )


class DiskFull(VaeAnomalyError):
    """A write failed for want of room; what was being written is left as it was."""


def no_room(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of room (see :data:`NO_ROOM`)."""
    return isinstance(e, OSError) and e.errno in NO_ROOM


# ---------------------------------------------------------------- HTTP errors


class ServiceError(Exception):
    status_code = 400
    reason = "bad_request"  # label of vae_anomaly_invalid_records_total, when it counts

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or []

    def __reduce__(self) -> tuple[Any, ...]:  # raised in the parsing process, rendered here
        return (type(self), (self.message, self.errors))

    def forget(self) -> None:
        """Drop what the error keeps reachable beyond its message: its traceback (the frames,
        with a parsed body and its locals) and the exceptions it was raised from."""
        self.__traceback__ = self.__context__ = self.__cause__ = None


class BadRequest(ServiceError):
    status_code = 400


class InvalidJSON(ServiceError):
    status_code = 400
    reason = "invalid_json"


class InvalidRecords(ServiceError):
    status_code = 422
    reason = "invalid_records"


class InvalidParameters(ServiceError):
    status_code = 422
    reason = "invalid_parameters"


class PayloadTooLarge(ServiceError):
    status_code = 413
    reason = "body_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    reason = "unsupported_media_type"


class ClientClosed(ServiceError):
    """The client went away before its request was read: no one gets the answer; counted and
    logged as 499 (the client's doing, not a server error)."""

    status_code = 499
    reason = "client_closed"


class NotFound(ServiceError):
    status_code = 404


class NotReady(ServiceError):
    status_code = 503


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class Timeout(ServiceError):
    status_code = 503
    reason = "timeout"


# ---------------------------------------------------------------- error bodies, for OpenAPI


class ErrorItem(BaseModel):
    record: int | None = None
    field: str | None = None
    reason: str
    message: str


class ErrorBody(BaseModel):
    """The native API's error: a message and, for bad input, one item per problem."""

    error: str
    errors: list[ErrorItem] = []


class V2ErrorBody(BaseModel):
    """The Open Inference Protocol's error object."""

    error: str


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        400: {"model": model, "description": "not JSON, or not the expected shape"},
        401: {"model": model, "description": "no API key (when keys are configured)"},
        403: {"model": model, "description": "API key not accepted"},
        404: {"model": model, "description": "no such model or version"},
        413: {"model": model, "description": "body over the size limit"},
        415: {"model": model, "description": "body not sent as application/json"},
        422: {"model": model, "description": "invalid records or parameters"},
        503: {"model": model, "description": "no model ready, or the request timed out"},
    }


ERROR_RESPONSES = error_responses(ErrorBody)
V2_ERROR_RESPONSES = error_responses(V2ErrorBody)
