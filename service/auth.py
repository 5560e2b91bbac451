"""Who may call what: optional API keys for scoring, the admin token for admin endpoints.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Secrets are kept
only as SHA-256 digests and compared with :func:`hmac.compare_digest` against every configured
secret (no early exit, no length leak); they are never logged. No key: 401; a wrong key: 403.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fastapi import Request

from service.errors import Forbidden, NotFound, Unauthorized


class Secrets:
    """A set of accepted secrets, as digests."""

    def __init__(self, secrets: list[str]) -> None:
        self.digests = [hashlib.sha256(s.encode()).digest() for s in secrets]

    def accepts(self, given: str) -> bool:
        g = hashlib.sha256(given.encode()).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(g, d)
        return ok


def presented(headers: Mapping[str, str], *, api_key_header: bool) -> str | None:
    """The credential in request headers (or gRPC metadata): a bearer token, else (if allowed)
    an X-API-Key."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key_header:
        key = headers.get("x-api-key")
        if key:
            return key.strip()
    return None


def check_api_key(request: Request) -> None:
    """Raise 401/403 unless scoring is open or the request carries a configured API key."""
    check_key(request.app.state.api_keys, request.headers)


def check_key(keys: Secrets | None, headers: Mapping[str, str]) -> None:
    """Raise 401/403 unless ``keys`` is None (open) or ``headers`` carry one of them."""
    if keys is None:
        return
    given = presented(headers, api_key_header=True)
    if given is None:
        raise Unauthorized("this needs an API key: Authorization: Bearer <key> or X-API-Key: <key>")
    if not keys.accepts(given):
        raise Forbidden("API key not accepted")


async def require_api_key(request: Request) -> None:
    """:func:`check_api_key` as a route dependency."""
    check_api_key(request)


async def require_metadata_key(request: Request) -> None:
    """/metrics, /docs and /openapi.json: open, or (``protect_metadata``) as scoring."""
    if request.app.state.settings.protect_metadata:
        check_api_key(request)


async def require_admin(request: Request) -> None:
    """Admin endpoints: off (404) without an admin token configured; else the token, as a
    bearer token, or 401/403."""
    token: Secrets | None = request.app.state.admin_token
    if token is None:
        raise NotFound("admin endpoints are off (no admin token is configured)")
    given = presented(request.headers, api_key_header=False)
    if given is None:
        raise Unauthorized("this needs the admin token: Authorization: Bearer <token>")
    if not token.accepts(given):
        raise Forbidden("wrong admin token")
