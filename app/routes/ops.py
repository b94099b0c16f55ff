"""Operations: ``/healthz`` (API, Redis, workers) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import Svc

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(services: Svc) -> JSONResponse:
    """200 when Redis answers (``workers`` counts those seen recently; 0 means jobs will
    wait), 503 when it does not. No authentication, so load balancers can call it; it
    therefore names no worker, host or error detail."""
    try:
        services.redis.ping()
        workers = len(services.queue.workers_alive())
    except redis.RedisError:
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, 503)
    status = "ok" if workers else "degraded: no worker seen recently"
    return JSONResponse({"status": status, "redis": "ok", "workers": workers})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: jobs by status, queue depth, live workers, cache hits and
    misses, dead-lettered jobs, request latency per route."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
