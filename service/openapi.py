"""The service's description of itself: ``/openapi.json`` (the served model's request schema,
with an example record that scores as it is) and the documentation pages ``/docs`` (Swagger UI)
and ``/redoc``, whose scripts and styles the service serves itself (service/static/): the
pages work with no network."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from service import explorer, timefeatures, v2, values
from service.auth import require_api_key
from service.bundle import (
    MISSING_INDEX,
    MISSING_TOKEN,
    UNKNOWN_TOKEN,
    BooleanFeature,
    CategoricalFeature,
    Manifest,
    NumericFeature,
)
from service.errors import NotFound
from service.http import JSON
from service.scoring import Scorer
from service.settings import Settings

FLOAT_MAX = 1.7976931348623157e308
STATIC = Path(__file__).parent / "static"
ASSETS = {  # served name -> (file, media type): nothing else is served from there
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css"),
    "favicon.png": ("swagger-ui/favicon-32x32.png", "image/png"),
    "redoc.standalone.js": ("redoc/redoc.standalone.js", "text/javascript"),
}
ASSET_URL = "/docs/static/"
# the pages may load from the service only: whatever a page's script would fetch from elsewhere
# (ReDoc's logo comes from a CDN) the browser does not even ask for
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
    "worker-src 'self' blob:; connect-src 'self'"
)
EXAMPLE_TIME = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)  # a Monday noon: any time is valid


def _field_type(f: NumericFeature | BooleanFeature | CategoricalFeature, max_len: int) -> Any:
    """The JSON types :func:`values.parse` accepts for ``f`` (null: missing, always accepted)."""
    number = Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)]
    text_number = Annotated[str, Field(pattern=values.NUMBER_PATTERN)]
    if isinstance(f, NumericFeature):
        return number | text_number | None
    if isinstance(f, BooleanFeature):
        words = Literal[tuple(sorted(values.TRUE_WORDS | values.FALSE_WORDS))]  # type: ignore[valid-type]
        return bool | number | words | text_number | None
    return Annotated[str, Field(max_length=max_len)] | number | bool | None


def _field_doc(f: NumericFeature | BooleanFeature | CategoricalFeature) -> str:
    if isinstance(f, NumericFeature):
        return (
            f"a number (or its decimal text); seen in training from {f.min:g} to {f.max:g}; "
            "a value far outside is scored and named in unusual_values"
        )
    if isinstance(f, BooleanFeature):
        return (
            "true or false (or 1/0, yes/no, y/n, t/f, on/off); another number is scored as "
            "missing and named in unusual_values"
        )
    cats = [c for c in f.categories if c not in (UNKNOWN_TOKEN, MISSING_TOKEN)]
    return (
        "one of "
        + ", ".join(repr(c) for c in cats[:50])
        + (" ..." if len(cats) > 50 else "")
        + "; other values are scored as never seen and named in unusual_values; a number is "
        "read as its decimal text"
    )


def request_model(m: Manifest, max_records: int, max_string_length: int) -> type[BaseModel]:
    """A pydantic model of the score request for this bundle's features (for the OpenAPI
    schema only: validation is :func:`records_to_columns`, which accepts exactly this)."""
    fields: dict[str, Any] = {}
    derived = timefeatures.derived_names(m)
    for f in m.features:
        if f.name in derived:
            continue  # sent as its date-time field, below
        typ, desc = _field_type(f, max_string_length), _field_doc(f)
        if f.nullable:
            fields[f.name] = (typ, Field(None, description=desc + "; may be null or left out"))
        else:
            desc += "; required (null is scored as unusual: it was never missing in training)"
            fields[f.name] = (typ, Field(..., description=desc))
    for d in m.datetime_columns:
        typ, desc = (
            (Annotated[str, Field(max_length=timefeatures.MAX_LENGTH)], "ISO 8601 date-time")
            if d.unit == "iso"
            else (Annotated[float, Field(ge=-FLOAT_MAX, le=FLOAT_MAX)], f"{d.unit} number")
        )
        desc += f"; time of day and day of week are derived ({d.timezone} time)"
        required = "; may be null or left out" if d.nullable else "; required (null is unusual)"
        fields[d.name] = (
            typ | None,
            Field(None if d.nullable else ..., description=desc + required),
        )
    for c in m.ignored_columns:
        fields[c] = (Any, Field(None, description="accepted and ignored (excluded in training)"))
    record = create_model(
        "Record", __config__=ConfigDict(extra="forbid"), __doc__="One record.", **fields
    )
    return create_model(
        "ScoreRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(list[record], Field(..., min_length=1, max_length=max_records)),  # type: ignore[valid-type]
    )


def example_record(m: Manifest) -> dict[str, Any]:
    """A typical record of the model: each numeric feature's training median (the value a
    missing one is imputed with), the commoner boolean, the most frequent category (training
    keeps the vocabulary in frequency order), each date-time at a fixed time. It is valid, so
    "Try it out" on /docs scores it as it is."""
    derived = timefeatures.derived_names(m)
    record: dict[str, Any] = {}
    for f in m.features:
        if f.name in derived:
            continue
        if isinstance(f, NumericFeature):
            record[f.name] = f.impute
        elif isinstance(f, BooleanFeature):
            record[f.name] = f.rate >= 0.5
        else:
            record[f.name] = f.categories[MISSING_INDEX + 1]
    for d in m.datetime_columns:
        seconds = EXAMPLE_TIME.timestamp()
        record[d.name] = (
            EXAMPLE_TIME.isoformat()
            if d.unit == "iso"
            else int(seconds)
            if d.unit == "epoch_s"
            else int(seconds * 1000)
        )
    return record


def install_openapi(app: FastAPI) -> None:
    """/openapi.json describes the service as it runs: the served model's request schema (real
    fields, types, categories, limits, an example), the V2 inference request, and the
    credentials each operation needs (the admin token; API keys when configured)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        comps = schema.setdefault("components", {})
        models = comps.setdefault("schemas", {})
        bodies: dict[str, type[BaseModel]] = {
            "InferenceRequest": v2.InferenceRequest,
            "RepositoryIndexRequest": v2.RepositoryIndexRequest,
        }
        scorer: Scorer | None = app.state.models.scorer
        if scorer is not None:
            settings: Settings = app.state.settings
            m = scorer.manifest
            bodies["ScoreRequest"] = request_model(
                m, settings.max_records, settings.max_string_length
            )
            ref = {"$ref": "#/components/schemas/ScoreRequest"}
            example = {"records": [example_record(m)]}
            schema["paths"]["/v1/score"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref, "example": example}},
            }
            explorer.document(schema, scorer, settings.max_records)
        for name, model in bodies.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(js.pop("$defs", {}))
            models[name] = js
        _security(app, schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _security(app: FastAPI, schema: dict[str, Any]) -> None:
    schemes = schema["components"].setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    if app.state.api_keys is not None:
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, ops in schema["paths"].items():
        for op in ops.values():
            if path.startswith("/v1/admin/"):
                op["security"] = [{"bearer": []}]
            elif app.state.api_keys is not None and "401" in op.get("responses", {}):
                op["security"] = [{"bearer": []}, {"apiKey": []}]


def install_docs(app: FastAPI, keyed: bool) -> None:
    """/openapi.json, /docs and /redoc, their scripts and styles served from the package (no
    CDN: the pages work offline). Routes of their own, so metrics label them by their paths.
    ``keyed`` (``protect_metadata``): the schema and /docs need an API key (the schema shows
    each feature's training range and categories) and there is no /redoc."""
    opts: dict[str, Any] = {"include_in_schema": False}
    if keyed:
        opts["dependencies"] = [Depends(require_api_key)]
    title = f"{app.title} - docs"

    @app.get("/openapi.json", **opts)
    async def openapi_json() -> JSON:
        return JSON(app.openapi())

    @app.get("/docs", **opts)
    async def swagger_ui() -> HTMLResponse:
        return _own_only(
            get_swagger_ui_html(
                openapi_url="/openapi.json",
                title=title,
                swagger_js_url=ASSET_URL + "swagger-ui-bundle.js",
                swagger_css_url=ASSET_URL + "swagger-ui.css",
                swagger_favicon_url=ASSET_URL + "favicon.png",
                swagger_ui_parameters={"validatorUrl": None},  # no calls to swagger.io
            )
        )

    if not keyed:

        @app.get("/redoc", include_in_schema=False)
        async def redoc() -> HTMLResponse:
            return _own_only(
                get_redoc_html(
                    openapi_url="/openapi.json",
                    title=title,
                    redoc_js_url=ASSET_URL + "redoc.standalone.js",
                    redoc_favicon_url=ASSET_URL + "favicon.png",
                    with_google_fonts=False,
                )
            )

    @app.get(ASSET_URL + "{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        # public library code, no key: the pages' <script> and <link> tags cannot send one
        if name not in ASSETS:
            raise NotFound(f"no such file: {name[:80]}")
        file, media_type = ASSETS[name]
        return FileResponse(STATIC / file, media_type=media_type)


def _own_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page
