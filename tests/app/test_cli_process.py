"""``influence-service serve`` as a process tree (embedded Redis + a local worker): a
terminal's Ctrl-C (SIGINT to the whole foreground process group) lets the running job
finish and only then stops Redis, flushing its append-only file; and no child outlives a
serve that is killed hard."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

import models
from app.cli import GRACEFUL_SHUTDOWN_S
from app.embedded import EmbeddedRedis
from worker.contract import JobStatus
from worker.queue import JobQueue
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PREFIX = Settings.model_fields["key_prefix"].default


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class Serve:
    """``influence-service serve`` on a free port and its own data directory, started as a
    shell starts a job: the leader of a new process group."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir, self.log = data_dir, log
        self.api = f"http://127.0.0.1:{_free_port()}"
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "REDIS_URL" and not k.startswith("INFLUENCE_")
        }
        env["PYTHONPATH"] = str(REPO)
        env["OMP_NUM_THREADS"] = "1"  # small torch ops on a busy test machine: one thread
        command = [sys.executable, "-c", "from app.cli import main; main()", "serve"]
        port = self.api.rsplit(":", 1)[1]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "--port", port, "--data-dir", str(data_dir)],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children: list[int] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the API answers and its worker has been seen; notes the child pids."""

        def ready() -> bool:
            assert self.process.poll() is None, f"serve exited:\n{self.output()}"
            try:
                return bool(httpx.get(f"{self.api}/healthz").json().get("workers"))
            except (httpx.TransportError, ValueError):
                return False

        _until(ready, timeout, f"serve did not come up:\n{self.output()}")
        self.children = _children(self.process.pid)

    def close(self) -> None:
        """Kill whatever is left (after a failed test)."""
        for pid in [self.process.pid, *self.children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def serve(tmp_path: Path, demo: tuple[Path, models.Dataset, models.Dataset]) -> Iterator[Serve]:
    data_dir = tmp_path / "svc"
    # the session's trained demo where serve looks for it, so it is not trained again
    shutil.copytree(demo[0].parent, data_dir / "demo", dirs_exist_ok=True)
    server = Serve(data_dir, tmp_path / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_ctrl_c_lets_the_running_job_finish_before_redis_stops(serve: Serve) -> None:
    # Ctrl-C reaches the terminal's foreground process group: serve's children must not be
    # in it (sessions of their own), or Redis stops under the running job.
    assert len(serve.children) == 2, serve.children  # redis-server and one worker
    for child in serve.children:
        assert os.getsid(child) != os.getsid(serve.process.pid)
    api = serve.api
    names = {d["name"]: d["id"] for d in httpx.get(f"{api}/datasets").json()}
    model = httpx.get(f"{api}/models").json()[0]["id"]
    query = {
        "model": model,
        "train": names["digits-train"],
        "test": {"dataset": names["digits-test"], "indices": [0]},
        # seconds of LiSSA steps (4 × ~1000), each one reporting its progress to Redis
        "solver": {"name": "lissa", "depth": 2000, "repeats": 4},
    }
    job = httpx.post(f"{api}/influence", json=query).json()["job"]

    def running() -> bool:
        state = httpx.get(f"{api}/jobs/{job}").json()
        assert state["status"] in ("queued", "running"), state
        return state["status"] == "running" and state["progress"] > 0

    _until(running, 120, "the job did not start")
    # a dashboard following a job queued behind it (its stream idle): the stream must end
    waiting = httpx.post(
        f"{api}/influence", json={**query, "test": {**query["test"], "indices": [1]}}
    )
    stream = f"{api}/jobs/{waiting.json()['job']}/events"
    stream_ended: list[float] = []
    follower = threading.Thread(target=_follow, args=(stream, stream_ended))
    follower.start()
    time.sleep(1.0)
    assert not stream_ended, "the event stream ended before Ctrl-C"
    interrupted = time.time()
    os.killpg(serve.process.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
    time.sleep(0.5)
    assert all(_alive(pid) for pid in serve.children), "Ctrl-C reached serve's children"
    follower.join(timeout=30)
    # it ended by itself, before uvicorn's graceful-shutdown timeout would have cut it
    assert stream_ended and stream_ended[0] - interrupted < GRACEFUL_SHUTDOWN_S, stream_ended

    code = serve.process.wait(timeout=300)
    output = serve.output()
    assert code == 128 + signal.SIGINT, output
    assert "Traceback" not in output, output
    assert not [pid for pid in serve.children if _alive(pid)], "children outlived serve"

    redis_dir = serve.data_dir / "redis"
    assert "ready to exit" in (redis_dir / "redis.log").read_text()  # a clean SHUTDOWN
    with EmbeddedRedis(redis_dir) as server:  # the AOF loads: the job finished in attempt 1
        client = redis.Redis.from_url(server.url, decode_responses=True)
        settings = Settings(
            redis_url=server.url, data_dir=serve.data_dir, key_prefix=DEFAULT_PREFIX
        )
        record = JobQueue(client, settings).get(job)
        client.close()
    assert record is not None
    assert record.status == JobStatus.SUCCEEDED and record.attempts == 1, (record, output)
    assert record.finished is not None and record.finished > interrupted  # it was running


def _follow(url: str, ended: list[float]) -> None:
    """Read the event stream at ``url`` to its end; note when it ended."""
    with httpx.stream("GET", url, timeout=60) as response:
        for _ in response.iter_lines():
            pass
    ended.append(time.time())


def test_children_do_not_outlive_a_killed_serve(serve: Serve) -> None:
    os.kill(serve.process.pid, signal.SIGKILL)
    serve.process.wait(timeout=10)
    _until(
        lambda: not [pid for pid in serve.children if _alive(pid)],
        30,
        "the worker or Redis outlived serve",
    )
    # Redis got SIGTERM when its parent died: a clean shutdown, the AOF flushed
    assert "ready to exit" in (serve.data_dir / "redis" / "redis.log").read_text()
