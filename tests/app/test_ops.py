"""Operations endpoints: Prometheus metrics, health, and Redis outages as 503."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from worker.settings import Settings


def test_metrics_report_queue_state_and_request_latency(
    settings_factory: Callable[..., Settings],
) -> None:
    with TestClient(create_app(settings_factory())) as client:
        assert client.get("/models").status_code == 200
        client.post("/influence", json={"model": "0" * 64, "train": "0" * 64})  # 422
        text = client.get("/metrics").text
    assert 'influence_jobs{status="queued"} 0.0' in text
    assert "influence_queue_depth 0.0" in text
    assert "influence_workers_alive 0.0" in text
    assert "influence_cache_hits_total 0.0" in text
    assert (
        'influence_http_request_seconds_count{method="GET",route="/models",status="200"} 1.0'
        in text
    )
    assert 'route="/influence",status="422"' in text


def test_health_without_workers_is_degraded(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())) as client:
        health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "degraded: no worker seen recently",
        "redis": "ok",
        "workers": [],
    }


def test_redis_outage_is_503_not_500(tmp_path: Path) -> None:
    settings = Settings(
        redis_url=f"unix://{tmp_path}/no-redis.sock", data_dir=tmp_path, key_prefix="t:"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 503
        response = client.get("/models")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("Redis unavailable")
