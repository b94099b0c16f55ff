"""Operations endpoints: Prometheus metrics, health, and Redis outages as 503."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.main import create_app
from app.services import ByteLRU
from tests.app.conftest import API_KEYS, LiveServer
from worker.settings import Settings


def test_metrics_report_queue_state_and_request_latency(
    settings_factory: Callable[..., Settings],
) -> None:
    with TestClient(create_app(settings_factory())) as client:
        assert client.get("/models").status_code == 200
        client.post("/influence", json={"model": "0" * 64, "train": "0" * 64})  # 422
        text = client.get("/metrics").text
    assert 'influence_jobs{status="queued"} 0.0' in text
    assert 'influence_jobs_finished_total{status="succeeded"} 0.0' in text
    assert 'influence_jobs{status="succeeded"}' not in text  # a count of the past, not a gauge
    assert "influence_queue_depth 0.0" in text
    assert "influence_workers_alive 0.0" in text
    assert "influence_cache_hits_total 0.0" in text
    assert (
        'influence_http_request_seconds_count{method="GET",route="/models",status="200"} 1.0'
        in text
    )
    assert 'route="/influence",status="422"' in text


def test_metrics_are_open_with_keys_set_and_name_no_tenant_data(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    """Scrapers have no key: /metrics answers without one, and shows aggregates only."""
    alice = {"Authorization": "Bearer key-alice"}
    test = {"dataset": uploaded["test"], "indices": [0]}
    body = {"model": uploaded["model"], "train": uploaded["train"], "test": test}
    job = httpx.post(f"{live.url}/influence", headers=alice, json=body).json()["job"]
    assert httpx.get(f"{live.url}/jobs/{job}", headers=alice).status_code == 200
    assert httpx.get(f"{live.url}/jobs/{job}").status_code == 401  # keys are enforced

    response = httpx.get(f"{live.url}/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'influence_jobs{status="queued"} 1.0' in text
    assert 'route="/jobs/{job_id}",status="200"' in text  # route templates, not paths
    for secret in (job, *uploaded.values(), "alice", "bob", *API_KEYS):
        assert secret not in text, secret


def test_health_without_workers_is_degraded(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())) as client:
        health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {  # a count only: the probe is public, worker names are not
        "status": "degraded: no worker seen recently",
        "redis": "ok",
        "workers": 0,
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
    assert "no-redis.sock" not in response.text  # the address is logged, not shown


def test_a_redis_that_stops_answering_is_503_within_seconds(tmp_path: Path) -> None:
    """A Redis that accepts connections and never replies (a hung server, a black-holed
    network) must not hold keyed requests: the rate limiter's async client times out too."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])  # and never answer

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = listener.getsockname()[1]
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp_path, key_prefix="t:")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            started = time.monotonic()
            response = client.get("/models")
            waited = time.monotonic() - started
    finally:
        stop.set()
        acceptor.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()
    assert response.status_code == 503, response.text
    assert str(port) not in response.text
    assert waited < 15, f"{waited:.1f} s"  # the 5 s socket timeout (it was 30 s)


def test_api_cache_is_bounded_by_bytes() -> None:
    cache = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now the most recent
    cache.put("c", "C", 40)  # over 100 bytes: the least recent ("b") goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    assert cache.size == 80
    cache.put("huge", "H", 101)  # larger than the whole cache: never kept
    assert cache.get("huge") is None and cache.size == 80
