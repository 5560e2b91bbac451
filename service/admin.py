"""Admin endpoints (``/v1/admin``): off unless an admin token is configured."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request

from service.errors import Conflict, Forbidden, NotFound, Unauthorized
from service.lifecycle import ModelManager


async def require_admin(request: Request) -> None:
    token: str | None = request.app.state.admin_token
    if token is None:
        raise NotFound("admin endpoints are off (no admin token is configured)")
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer "):
        raise Unauthorized("this needs the admin token: Authorization: Bearer <token>")
    if not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise Forbidden("wrong admin token")


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/reload", summary="Load the serving version now (instead of at the next poll)")
async def reload(request: Request) -> dict[str, Any]:
    models: ModelManager = request.app.state.models
    r = await models.reload(retry_refused=True)
    if r.error is not None:
        raise Conflict(f"not reloaded, still serving {r.version}: {r.error}")
    return {"changed": r.changed, "version": r.version, "previous": r.previous}
