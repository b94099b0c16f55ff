"""The FastAPI application factory.

``create_app(settings)`` wires the routes to the services of one deployment (Redis, job
queue, artifact store); it starts nothing heavy. OpenAPI is at ``/docs`` and
``/openapi.json``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import Scope

from app import dashboard
from app.limits import BodySizeLimit
from app.metrics import RequestMetrics, new_registry
from app.routes import datasets, influence, jobs, ops
from app.routes import models as models_routes
from app.services import ServiceError, Services
from worker.settings import Settings
from worker.store import ArtifactNotFoundError

__all__ = ["ARTIFACT_MISSING", "UPLOAD_ROUTES", "create_app", "validation_details"]

log = logging.getLogger(__name__)

UPLOAD_ROUTES = frozenset({"/models", "/datasets"})
"""POST paths whose bodies may be as large as ``max_upload_bytes`` (others: max_body_bytes)."""

ARTIFACT_MISSING = (
    "the stored result (or data) this answer needs is missing from the artifact store: it "
    "was deleted, or this API process does not share the workers' data volume "
    "(INFLUENCE_DATA_DIR). Submit the query again to recompute it."
)
"""Detail of the 410 answered when a job or dataset record names an absent artifact."""


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
    )
    app.state.services = services
    app.state.metrics = new_registry(services.queue)

    def body_limit(scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_ROUTES:
            return settings.max_upload_bytes
        return settings.max_body_bytes

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"Redis unavailable: {exc}"}, 503)

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
    return app
