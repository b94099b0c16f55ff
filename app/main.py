"""The FastAPI application factory.

``create_app(settings)`` wires the routes to the services of one deployment (Redis, job
queue, artifact store); it starts nothing heavy. OpenAPI is at ``/docs`` and
``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import Scope

from app import dashboard
from app.limits import BodySizeLimit
from app.metrics import RequestMetrics, new_registry
from app.routes import datasets, influence, jobs, ops
from app.routes import models as models_routes
from app.services import Services
from worker.settings import Settings

__all__ = ["UPLOAD_ROUTES", "create_app"]

UPLOAD_ROUTES = frozenset({"/models", "/datasets"})
"""POST paths whose bodies may be as large as ``max_upload_bytes`` (others: max_body_bytes)."""


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

    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.add_middleware(RequestMetrics, registry=app.state.metrics)
    for module in (models_routes, datasets, influence, jobs, ops, dashboard):
        app.include_router(module.router)
    return app
