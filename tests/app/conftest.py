"""Fixtures for the API tests: a real Redis (REDIS_URL when set, else the embedded
server the CLI uses), a unique key prefix per test (its keys deleted afterwards), the
API served by uvicorn on a loopback port in a thread, and worker threads.

Nothing is mocked: requests go over HTTP to the real app, jobs through Redis to real
workers running the engine.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import uvicorn

import models
from app.client import InfluenceClient
from app.main import create_app
from worker.main import run_worker
from worker.queue import JobQueue
from worker.settings import Settings
from worker.store import ArtifactStore

API_KEYS = {"key-alice": "alice", "key-bob": "bob"}


LM_CONFIG = {  # a tiny language model (vocabulary 11, context 4) for token tests
    "architecture": "transformer_lm",
    "vocab_size": 11,
    "context_length": 4,
    "d_model": 8,
    "n_layers": 1,
    "n_heads": 2,
}


def make_settings(redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for one test: its own key prefix and data directory, fast leases."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "key_prefix": f"test-api:{uuid.uuid4().hex[:12]}:",
        "lease_seconds": 5.0,
        "heartbeat_seconds": 1.0,
        "rate_limit_per_s": 1000.0,
        "rate_limit_burst": 1000,
        **overrides,
    }
    return Settings(**values)


def delete_keys(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings_factory(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Build settings (sharing this test's data directory); all their keys go afterwards."""
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        made.append(make_settings(redis_url, tmp_path / "data", **overrides))
        return made[-1]

    yield factory
    for settings in made:
        delete_keys(redis_url, settings.key_prefix)


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    """Two tenants (alice, bob) with API keys."""
    return settings_factory(api_keys=API_KEYS)


class LiveServer:
    """``create_app(settings)`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> LiveServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=20)
        self.server = self.thread = None

    def client(self, api_key: str | None = "key-alice") -> InfluenceClient:
        return InfluenceClient(self.url, api_key=api_key)


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    yield server
    server.stop()


class WorkerThreads:
    """Workers (``worker.main.run_worker``) in threads of this process."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, settings: Settings, count: int = 1) -> None:
        for i in range(count):
            thread = threading.Thread(
                target=run_worker,
                args=(settings,),
                kwargs={"stop": self.stop, "name": f"test-worker-{i}"},
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def workers() -> Iterator[WorkerThreads]:
    pool = WorkerThreads()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, models.Dataset, models.Dataset]:
    """BENCHMARKS.md's model A (digits MLP, 3,466 parameters), trained once per session."""
    return models.demo_checkpoint(tmp_path_factory.mktemp("demo"))


def dataset_bytes(dataset: models.Dataset, directory: Path) -> bytes:
    path = directory / f"{dataset.id}.safetensors"
    models.save_dataset(path, dataset)
    return path.read_bytes()


@pytest.fixture
def uploaded(
    live: LiveServer, demo: tuple[Path, models.Dataset, models.Dataset], tmp_path: Path
) -> dict[str, str]:
    """The demo checkpoint and both digits splits uploaded by alice over HTTP."""
    checkpoint, train, test = demo
    with live.client() as client:
        model = client.upload_model(checkpoint, name="digits-mlp")
        train_record = client.upload_dataset(dataset_bytes(train, tmp_path), name="train")
        test_record = client.upload_dataset(dataset_bytes(test, tmp_path), name="test")
    return {"model": model.id, "train": train_record.id, "test": test_record.id}


@pytest.fixture
def queue(settings: Settings) -> Iterator[JobQueue]:
    """The job queue of ``settings`` (to finish jobs by hand, without a worker)."""
    client = redis.Redis.from_url(str(settings.redis_url), decode_responses=True)
    yield JobQueue(client, settings)
    client.close()


def finish_influence_job(queue: JobQueue, settings: Settings, job: str, num_train: int) -> str:
    """Complete queued influence job ``job`` by hand with a stored [2, N] score matrix (as
    a worker would); returns the scores artifact id."""
    claim = None
    for _ in range(10):  # canceled jobs ahead of it in the stream are skipped one per claim
        claim = queue.claim("test-finisher", block_ms=0)
        if claim is not None:
            break
    assert claim is not None and claim.job_id == job
    store = ArtifactStore.for_settings(settings)
    scores = store.put_tensors({"scores": torch.randn(2, num_train)})
    result = {
        "scores": scores,
        "s_test": scores,
        "num_test": 2,
        "num_train": num_train,
        "test_targets": [0, 1],
    }
    queue.complete(claim, result)
    return scores
