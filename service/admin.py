"""Admin endpoints (``/v1/admin``): off unless an admin token is configured."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.auth import require_admin
from service.errors import ERROR_RESPONSES, Conflict, ErrorBody
from service.lifecycle import ModelManager

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        **{k: v for k, v in ERROR_RESPONSES.items() if k in (401, 403)},
        404: {"model": ErrorBody, "description": "admin endpoints are off (no admin token)"},
        409: {"model": ErrorBody, "description": "the new version was refused"},
    },
)


@router.post("/reload", summary="Load the serving version now (instead of at the next poll)")
async def reload(request: Request) -> dict[str, Any]:
    models: ModelManager = request.app.state.models
    r = await models.reload(retry_refused=True)
    if r.error is not None:
        raise Conflict(f"not reloaded, still serving {r.version}: {r.error}")
    return {"changed": r.changed, "version": r.version, "previous": r.previous}
