"""Fixtures for the worker tests: the session's real Redis (``redis_url`` in
tests/conftest.py), a unique key prefix per test (its keys deleted afterwards), the artifact
store in a temporary directory, a tiny registered MLP and dataset, worker runners (a
thread, or ``python -m worker`` subprocesses) and a TCP relay to that Redis that a test
can cut to stage an outage."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import torch

import models
from worker.main import connect, run_worker
from worker.queue import JobQueue, JobRecord
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"
MLP_CONFIG = {"architecture": "mlp", "in_features": 4, "out_features": 3, "hidden": [6]}


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        key_prefix=f"test-worker:{uuid.uuid4().hex[:12]}:",
        lease_seconds=2.0,
        heartbeat_seconds=0.5,
        max_attempts=3,
        shard_size=10_000,
        job_time_limit_seconds=120.0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    conn = connect(settings)
    yield conn
    keys = list(conn.scan_iter(match=f"{settings.key_prefix}*", count=1000))
    if keys:
        conn.delete(*keys)
    conn.close()


@pytest.fixture
def queue(client: redis.Redis, settings: Settings) -> JobQueue:
    return JobQueue(client, settings)


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return ArtifactStore.for_settings(settings)


@pytest.fixture
def registry(client: redis.Redis, settings: Settings, store: ArtifactStore) -> Registry:
    return Registry(client, settings, store)


def checkpoint_bytes(model: torch.nn.Module, config: dict, directory: Path) -> bytes:
    path = directory / f"ckpt-{uuid.uuid4().hex[:8]}.safetensors"
    models.save_checkpoint(path, model, config)
    return path.read_bytes()


def dataset_bytes(dataset: models.Dataset, directory: Path) -> bytes:
    path = directory / f"data-{uuid.uuid4().hex[:8]}.safetensors"
    models.save_dataset(path, dataset)
    return path.read_bytes()


@pytest.fixture
def tiny(registry: Registry, store: ArtifactStore, tmp_path: Path) -> dict:
    """A 4→6→3 MLP and 40 training / 3 test points, registered for TENANT."""
    gen = torch.Generator().manual_seed(0)
    model = models.build(MLP_CONFIG)
    inputs = torch.randn(43, 4, generator=gen)
    targets = torch.randint(0, 3, (43,), generator=gen)
    meta = {"name": "tiny", "task": "classification", "num_classes": 3}
    train = models.Dataset(inputs[:40], targets[:40], meta)
    model_record = registry.put_model(
        TENANT, MLP_CONFIG, checkpoint_bytes(model, MLP_CONFIG, tmp_path)
    )
    data_record = registry.put_dataset(TENANT, dataset_bytes(train, tmp_path))
    test_artifact = store.put_tensors({"inputs": inputs[40:], "targets": targets[40:]})
    return {
        "model": model,
        "train": train,
        "test": (inputs[40:], targets[40:]),
        "model_id": model_record["id"],
        "model_artifact": model_record["artifact"],
        "train_id": data_record["id"],
        "test_artifact": test_artifact,
    }


def influence_payload(tiny: dict, **solver: object) -> dict:
    return {
        "model": tiny["model_id"],
        "train": tiny["train_id"],
        "loss": "cross_entropy",
        "damping": 1e-2,
        "solver": {"name": "exact", **solver},
        "test": {"artifact": tiny["test_artifact"]},
    }


def wait_for(
    queue: JobQueue, job_id: str, done: Callable[[JobRecord], bool], timeout: float = 60.0
) -> JobRecord:
    """Poll the job until ``done(record)``; fail the test after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = queue.get(job_id)
        if record is not None and done(record):
            return record
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not reach the expected state: {queue.get(job_id)}")


def finished(record: JobRecord) -> bool:
    return record.status.terminal


@pytest.fixture
def thread_worker(settings: Settings) -> Iterator[Callable[..., None]]:
    """Start in-process workers (threads); all are stopped after the test."""
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(name: str | None = None, **overrides: object) -> None:
        stop = threading.Event()
        worker_settings = settings.model_copy(update=overrides) if overrides else settings
        thread = threading.Thread(
            target=run_worker, args=(worker_settings,), kwargs={"stop": stop, "name": name}
        )
        thread.start()
        stops.append((stop, thread))

    yield start
    for stop, _ in stops:
        stop.set()
    for _, thread in stops:
        thread.join(timeout=30)


@pytest.fixture
def process_worker(settings: Settings) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start ``python -m worker`` subprocesses on the test's Redis keys and store."""
    procs: list[subprocess.Popen] = []
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "INFLUENCE_KEY_PREFIX": settings.key_prefix,
        "INFLUENCE_DATA_DIR": str(settings.data_dir),
        "INFLUENCE_LEASE_SECONDS": str(settings.lease_seconds),
        "INFLUENCE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "INFLUENCE_MAX_ATTEMPTS": str(settings.max_attempts),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }

    def start(name: str) -> subprocess.Popen:
        log = open(settings.data_dir.parent / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--name", name],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the other side
        sock.shutdown(socket.SHUT_RDWR)


class RedisRelay:
    """A TCP relay in front of the real Redis at ``target_url``: clients of ``url`` reach
    it until :meth:`cut`, which drops every relayed connection and refuses new ones (a
    Redis outage as a client sees it), until :meth:`restore`."""

    def __init__(self, target_url: str) -> None:
        self.target = redis.connection.parse_url(target_url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        auth = ""
        if self.target.get("password"):
            user = quote(self.target.get("username") or "", safe="")
            auth = f"{user}:{quote(self.target['password'], safe='')}@"
        port = self.listener.getsockname()[1]
        self.url = f"redis://{auth}127.0.0.1:{port}/{self.target.get('db', 0)}"
        self.down = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _upstream(self) -> socket.socket:
        if "path" in self.target:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.target["path"])
            return conn
        return socket.create_connection((self.target["host"], self.target["port"]))

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = self._upstream()
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            _shutdown(sock)

    def cut(self) -> None:
        self.down.set()
        with self.lock:
            for sock in self.sockets:
                _shutdown(sock)
                sock.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        self.cut()


@pytest.fixture
def redis_relay(redis_url: str) -> Iterator[RedisRelay]:
    relay = RedisRelay(redis_url)
    yield relay
    relay.close()
