"""The FastAPI application factory.

``create_app(settings)`` wires the routes to the services of one deployment (Redis, job
queue, artifact store); it starts nothing heavy. OpenAPI is at ``/openapi.json``, Swagger
UI at ``/docs`` and ReDoc at ``/redoc``, both pages served with their scripts and styles
from the files the ``fastapi-offline`` package ships (Swagger UI 5, which renders OpenAPI
3.1, and ReDoc), mounted under ``/docs-static``: no CDN, so they work offline.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from app import dashboard
from app.limits import BodySizeLimit
from app.metrics import RequestMetrics, new_registry
from app.routes import datasets, influence, jobs, ops
from app.routes import models as models_routes
from app.services import ServiceError, Services
from worker.settings import Settings
from worker.store import ArtifactNotFoundError

__all__ = [
    "ARTIFACT_MISSING",
    "DOCS_STATIC",
    "UPLOAD_ROUTES",
    "create_app",
    "docs_page",
    "redoc_page",
    "validation_details",
]

log = logging.getLogger(__name__)

UPLOAD_ROUTES = frozenset({"/models", "/datasets"})
"""POST paths whose bodies may be as large as ``max_upload_bytes`` (others: max_body_bytes)."""

ARTIFACT_MISSING = (
    "the stored result (or data) this answer needs is missing from the artifact store: it "
    "was deleted, or this API process does not share the workers' data volume "
    "(INFLUENCE_DATA_DIR). Submit the query again to recompute it."
)
"""Detail of the 410 answered when a job or dataset record names an absent artifact."""

REDIS_UNAVAILABLE = (
    "Redis unavailable: the service's store is unreachable or not answering; retry later "
    "(the server log has the cause)"
)
"""Detail of the 503 answered when a request meets a Redis error."""


def validation_details(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as the API answers them: ``loc``, ``msg`` and ``type`` of each.
    The rejected ``input`` (and ``ctx``) are left out: they may hold values JSON cannot
    carry (NaN, ±Infinity, raw bytes of a malformed body) and echo what the caller sent."""
    return [
        {
            "loc": [part if isinstance(part, int) else str(part) for part in error["loc"]],
            "msg": str(error["msg"]),
            "type": str(error["type"]),
        }
        for error in errors
    ]


DOCS_STATIC = "/docs-static"
"""Where the API pages' scripts and styles are served from (``DOCS_FILES``)."""
DOCS_FILES = Path(fastapi_offline.__file__).parent / "static"
"""Swagger UI 5 (``swagger-ui-bundle.js``, ``swagger-ui.css``), ReDoc
(``redoc.standalone.js``) and ``favicon.png``, as the ``fastapi-offline`` package ships them."""


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    """``page`` with a Content-Security-Policy as strict as the API pages allow: scripts
    from this server plus the page's own inline start-up script (pinned by its hash),
    connections to this server only. Swagger UI and ReDoc set inline styles and draw icons
    from ``data:`` URLs, and ReDoc runs its search in a ``blob:`` worker, so those are
    allowed."""
    html = bytes(page.body).decode()
    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    digests = (base64.b64encode(hashlib.sha256(script.encode()).digest()) for script in inline)
    hashes = "".join(f" 'sha256-{digest.decode()}'" for digest in digests)
    policy = (
        f"default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


def docs_page(openapi_url: str, title: str) -> HTMLResponse:
    """Swagger UI for ``openapi_url``, every asset from ``DOCS_STATIC``."""
    return _with_policy(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
        )
    )


def redoc_page(openapi_url: str, title: str) -> HTMLResponse:
    """ReDoc for ``openapi_url``, every asset from ``DOCS_STATIC`` (no Google fonts)."""
    return _with_policy(
        get_redoc_html(
            openapi_url=openapi_url,
            title=title,
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )
    )


def create_app(settings: Settings) -> FastAPI:
    """The API for ``settings`` (``settings.redis_url`` must be set)."""
    services = Services.connect(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await services.aclose()

    app = FastAPI(
        title="influence-service",
        version="0.1.0",
        description="Which training examples made my model do this? Influence functions "
        "after Bae et al. (NeurIPS 2022). Scores: (1/N) grad L_test^T (G + damping I)^-1 "
        "grad L_i = predicted change of the test loss when training point i is removed; "
        "positive = helpful, negative = harmful.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: served below
        redoc_url=None,  # from local files instead
    )
    app.state.services = services
    app.state.metrics = new_registry(services.queue)

    def body_limit(scope: Scope) -> tuple[int, str]:
        if scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_ROUTES:
            return settings.max_upload_bytes, "INFLUENCE_MAX_UPLOAD_BYTES"
        return settings.max_body_bytes, "INFLUENCE_MAX_BODY_BYTES"

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        # the cause names Redis's address: logged here, not shown to callers (/metrics
        # answers anyone)
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": REDIS_UNAVAILABLE}, 503)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_details(exc.errors())}, 422)

    @app.exception_handler(ServiceError)
    async def refused(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status_code)

    @app.exception_handler(ArtifactNotFoundError)
    async def artifact_missing(request: Request, exc: ArtifactNotFoundError) -> JSONResponse:
        # 410 Gone, not 404: the job (or dataset) the URL names exists and says it has this
        # result, but its file is gone; 404 would read as "no such job". Not a 5xx either:
        # retrying the same request cannot help, submitting the query again can.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": ARTIFACT_MISSING}, 410)

    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(RequestMetrics, registry=app.state.metrics)
    for module in (models_routes, datasets, influence, jobs, ops, dashboard):
        app.include_router(module.router)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return docs_page(app.openapi_url or "/openapi.json", f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return redoc_page(app.openapi_url or "/openapi.json", f"{app.title} - ReDoc")

    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_FILES), name="docs-static")
    return app
