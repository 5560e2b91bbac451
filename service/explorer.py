"""The model explorer over HTTP: ``POST /v1/encode``, ``POST /v1/decode``, ``GET /v1/map`` and
the page ``GET /explorer`` (static files in service/static/explorer). The latent space itself is
service/latent.py."""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from service.auth import require_api_key
from service.bundle import NumericFeature
from service.errors import ERROR_RESPONSES, Conflict, ErrorBody, InvalidRecords, NotFound
from service.http import JSON, ScorerDep, SettingsDep, offload, parse_body, read_body
from service.latent import Latent
from service.records import records_to_columns
from service.scoring import Scorer

router = APIRouter(tags=["explorer"])
NO_LATENT = {
    409: {"model": ErrorBody, "description": "the model has no latent-space files (retrain it)"}
}
KEYED: dict[str, Any] = {
    "dependencies": [Depends(require_api_key)],
    "responses": {**ERROR_RESPONSES, **NO_LATENT},
}
MAX_COORDINATE = 1e30  # beyond, map arithmetic in float32 overflows; +-10 is the clamp anyway
STATIC = {"explorer.js": "text/javascript", "explorer.css": "text/css"}
# the page loads nothing from elsewhere, and nothing it shows may run as script
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def latent_of(scorer: Scorer) -> Latent:
    """The served model's latent space, or 409 for a bundle trained without one."""
    if scorer.latent is None:
        m = scorer.manifest
        raise Conflict(
            f"model {m.name} {m.version} has no latent-space files (it was trained before the "
            "explorer existed); retrain it to explore it"
        )
    return scorer.latent


def _model(scorer: Scorer) -> dict[str, str]:
    return {"name": scorer.manifest.name, "version": scorer.version}


# ---------------------------------------------------------------- encode


class Posterior(BaseModel):
    mu: list[float] = Field(description="latent mean")
    sigma: list[float] = Field(description="latent standard deviation, per axis")
    map: list[float] = Field(description="map coordinates of mu")
    map_cov: list[list[float]] = Field(description="2x2 covariance of the posterior on the map")


class EncodeResponse(BaseModel):
    model: dict[str, str]
    results: list[Posterior]


def encoded(scorer: Scorer, lat: Latent, columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    out = lat.encode(scorer.encode(columns).inputs)
    axes = lat.map_axes
    # the posterior N(mu, diag(sigma^2)) seen on the map's plane: A diag(sigma^2) A^T
    cov = np.einsum("ik,nk,jk->nij", axes, out["sigma"].astype(np.float64) ** 2, axes)
    return [
        {"mu": mu, "sigma": sd, "map": xy, "map_cov": c}
        for mu, sd, xy, c in zip(
            out["mu"].tolist(),
            out["sigma"].tolist(),
            out["map"].tolist(),
            cov.tolist(),
            strict=True,
        )
    ]


@router.post(
    "/v1/encode", response_model=EncodeResponse, response_class=JSON, summary="Encode records",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}},
    **KEYED,
)  # fmt: skip
async def encode(request: Request, scorer: ScorerDep, settings: SettingsDep) -> JSON:
    """The encoder's posterior of each record (the request body of ``/v1/score``): latent
    mean and standard deviation, and where the mean lies on the map."""
    lat = latent_of(scorer)
    body = await read_body(request, settings.max_body_bytes)
    parsed = await parse_body(request, body, records_to_columns, scorer.records, settings)
    results = await offload(parsed.n, encoded, scorer, lat, parsed.columns)
    return JSON({"model": _model(scorer), "results": results})


# ---------------------------------------------------------------- decode


class DecodedRecord(BaseModel):
    latent: list[float]
    map: list[float]
    features: list[dict[str, Any]] = Field(
        description="per feature: expected value and 90% range (numeric), P(true) (boolean), "
        "the likeliest categories with their probabilities, P(missing)"
    )
    image: list[float] | None = Field(None, description="image-like models: pixels, row by row")


class DecodeResponse(BaseModel):
    model: dict[str, str]
    results: list[DecodedRecord]


def vectors(body: Any, latent_dim: int, max_n: int) -> tuple[str, np.ndarray]:
    """(``points`` or ``latent``, the vectors) of a decode request; InvalidRecords naming
    each problem otherwise."""
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in DECODE_KEYS:
        raise InvalidRecords(
            'the body must be {"points": [[x, y], ...]} or {"latent": [[z1, ...], ...]}',
            [_err(None, None, "wrong_type", "exactly one of points or latent")],
        )
    key, rows = next(iter(body.items()))
    width = 2 if key == "points" else latent_dim
    if not isinstance(rows, list) or not 1 <= len(rows) <= max_n:
        n = len(rows) if isinstance(rows, list) else "no list of"
        raise InvalidRecords(f"1 to {max_n} vectors are decoded at once, not {n}",
                             [_err(None, key, "batch_size", f"1 to {max_n} vectors")])  # fmt: skip
    errors = [
        _err(i, key, "wrong_type", f"expected {width} finite numbers")
        for i, r in enumerate(rows)
        if not (isinstance(r, list) and len(r) == width and all(map(_finite, r)))
    ]
    if errors:
        raise InvalidRecords(f"{len(errors)} of {len(rows)} vectors are invalid", errors[:100])
    return key, np.asarray(rows, dtype=np.float64)


DECODE_KEYS = ("points", "latent")


def _finite(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and abs(v) <= MAX_COORDINATE


def decode_schema(latent_dim: int | None, max_n: int) -> dict[str, Any]:
    """The decode request's JSON schema, exactly what :func:`vectors` accepts (for a model
    with ``latent_dim`` dimensions; None: any)."""
    number = {"type": "number", "minimum": -MAX_COORDINATE, "maximum": MAX_COORDINATE}

    def body(key: str, width: int | None, what: str) -> dict[str, Any]:
        vec: dict[str, Any] = {"type": "array", "items": number, "minItems": width or 1}
        if width:
            vec["maxItems"] = width
        rows = {"type": "array", "items": vec, "minItems": 1, "maxItems": max_n}
        return {
            "type": "object",
            "properties": {key: {**rows, "description": what}},
            "required": [key],
            "additionalProperties": False,
        }

    return {
        "oneOf": [
            body("points", 2, "map points [x, y]"),
            body("latent", latent_dim, "latent vectors (each axis clamped to +-10)"),
        ]
    }


def document(schema: dict[str, Any], scorer: Scorer, max_records: int) -> None:
    """Put the served model's decode request (its latent size, the limits) in ``schema``."""
    op = schema["paths"].get("/v1/decode", {}).get("post")
    if op is not None:
        dim = scorer.latent.section.latent if scorer.latent is not None else None
        content = {"application/json": {"schema": decode_schema(dim, max_records)}}
        op["requestBody"] = {"required": True, "content": content}


def _err(record: int | None, field: str | None, reason: str, message: str) -> dict[str, Any]:
    return {"record": record, "field": field, "reason": reason, "message": message}


def decoded(lat: Latent, key: str, vecs: np.ndarray) -> list[dict[str, Any]]:
    z = lat.from_map(vecs) if key == "points" else vecs
    recon = lat.decode(z)
    xy = lat.to_map(z)
    records = lat.records(recon)
    image = lat.section.image
    out = []
    for i, feats in enumerate(records):
        r: dict[str, Any] = {"latent": z[i].tolist(), "map": xy[i].tolist(), "features": feats}
        if image is not None:
            exp = {f["name"]: f["expected"] for f in feats if f["kind"] == "numeric"}
            r["image"] = [exp.get(p, image.background) for p in image.pixels]
        out.append(r)
    return out


@router.post(
    "/v1/decode", response_model=DecodeResponse, response_class=JSON, summary="Decode points",
    **KEYED,
)  # fmt: skip
async def decode(request: Request, scorer: ScorerDep, settings: SettingsDep) -> JSON:
    """Decode map points or latent vectors (each axis clamped to +-10) into records: what
    the model thinks a record there looks like, in the records' own units."""
    lat = latent_of(scorer)
    body = await read_body(request, settings.max_body_bytes)
    key, vecs = await parse_body(request, body, vectors, lat.section.latent, settings.max_records)
    results = await offload(len(vecs), decoded, lat, key, vecs)
    return JSON({"model": _model(scorer), "results": results})


# ---------------------------------------------------------------- map


@router.get("/v1/map", response_class=JSON, summary="The latent map", **KEYED)
async def latent_map(scorer: ScorerDep) -> JSON:
    """The map of the latent space: how it was made, its bounds, and a sample of held-out
    normal records' map coordinates with their score percentiles (and labels)."""
    lat = latent_of(scorer)
    s, m = lat.section, scorer.manifest
    image = None
    if s.image is not None:
        pix = {f.name: f for f in m.features if isinstance(f, NumericFeature)}
        used = [pix[p] for p in s.image.pixels if p in pix]
        lo = min([s.image.background, *(f.min for f in used)])
        hi = max([s.image.background, *(f.max for f in used)])
        image = {
            "width": s.image.width,
            "height": s.image.height,
            "pixels": s.image.pixels,
            "min": lo,
            "max": hi,
        }
    labels = s.sample.label
    return JSON(
        {
            "model": _model(scorer),
            "kind": s.map.kind,
            "latent": s.latent,
            "explained": s.map.explained,
            "bounds": s.bounds,
            "points": s.sample.model_dump(),
            "labels": sorted(set(labels)) if labels is not None else None,
            "threshold_percentile": 100 * (1 - m.target_fpr),
            "image": image,
        }
    )


# ---------------------------------------------------------------- the page


def _static(name: str) -> bytes:
    return (resources.files("service") / "static" / "explorer" / name).read_bytes()


@router.get("/explorer", include_in_schema=False)
async def page() -> Response:
    return Response(_static("index.html"), media_type="text/html", headers=PAGE_HEADERS)


@router.get("/explorer/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in STATIC:  # a fixed list: no path from the request reaches the file system
        raise NotFound(f"no such file: {name[:80]}")
    return Response(_static(name), media_type=STATIC[name], headers=PAGE_HEADERS)
