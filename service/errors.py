"""One error base class carrying its HTTP status; the app turns it into a JSON body."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    reason = "bad_request"  # label of vae_anomaly_invalid_records_total, when it counts

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or []


class BadRequest(ServiceError):
    status_code = 400


class InvalidJSON(ServiceError):
    status_code = 400
    reason = "invalid_json"


class InvalidRecords(ServiceError):
    status_code = 422
    reason = "invalid_records"


class PayloadTooLarge(ServiceError):
    status_code = 413
    reason = "body_too_large"


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
