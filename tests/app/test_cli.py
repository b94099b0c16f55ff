"""The CLI: the one-command start (embedded Redis + worker + demo) answers a ranking,
the demo bootstrap is idempotent, and ``query`` / ``rank`` print rankings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import models
from app.cli import DEMO_MODEL_NAME, bootstrap_demo, main
from tests.app.conftest import LiveServer, WorkerThreads
from worker.main import connect
from worker.settings import Settings
from worker.store import ArtifactStore, Registry

REPO = Path(__file__).resolve().parents[2]


def _with_trained_demo(data_dir: Path, demo: tuple[Path, models.Dataset, models.Dataset]) -> None:
    """Copy the session's trained demo where ``serve`` looks, so it is not trained again."""
    shutil.copytree(demo[0].parent, data_dir / "demo", dirs_exist_ok=True)


def test_bootstrap_demo_is_idempotent(
    settings_factory: Callable[..., Settings], demo: tuple[Path, models.Dataset, models.Dataset]
) -> None:
    settings = settings_factory()
    _with_trained_demo(settings.data_dir, demo)
    first, second = bootstrap_demo(settings), bootstrap_demo(settings)
    assert first == second
    registry = Registry(connect(settings), settings, ArtifactStore.for_settings(settings))
    tenant = settings.default_tenant
    assert [m["name"] for m in registry.list_models(tenant)] == [DEMO_MODEL_NAME]
    assert sorted(d["name"] for d in registry.list_datasets(tenant)) == [
        "digits-test",
        "digits-train",
    ]


def test_query_and_rank_commands_print_rankings(
    settings_factory: Callable[..., Settings],
    workers: WorkerThreads,
    demo: tuple[Path, models.Dataset, models.Dataset],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_factory()
    _with_trained_demo(settings.data_dir, demo)
    bootstrap_demo(settings)
    workers.start(settings)
    server = LiveServer(settings).start()
    try:
        main(["query", "--url", server.url, "--indices", "7", "--limit", "3"])
        out = capsys.readouterr().out
        job = out.split("job ", 1)[1].split()[0]
        assert "test point 0 (row 7)" in out and "removed" in out
        main(["rank", job, "--url", server.url, "--direction", "harmful", "--limit", "4"])
        table = capsys.readouterr().out.splitlines()
    finally:
        server.stop()
    rows = table[table.index(next(line for line in table if line.strip().startswith("rank"))) + 1 :]
    rows = [line for line in rows if not line.startswith("solver:")]
    scores = [float(line.split()[-1]) for line in rows]
    assert len(scores) == 4 and scores == sorted(scores) and scores[0] < 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_command_start_serves_the_demo(
    tmp_path: Path, demo: tuple[Path, models.Dataset, models.Dataset]
) -> None:
    """The README's run command with no Redis configured: embedded Redis, a worker, the
    demo, and a ranking over plain HTTP; SIGTERM stops the workers and Redis too."""
    data_dir = tmp_path / "svc"
    _with_trained_demo(data_dir, demo)
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("INFLUENCE_")
    }
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-c", "from app.cli import main; main()"]
    server = subprocess.Popen(
        [*command, "serve", "--port", str(port), "--data-dir", str(data_dir)], env=env, cwd=REPO
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/healthz").json().get("workers"):
                    break
            except (httpx.TransportError, ValueError):  # not up yet, or still starting
                pass
            assert server.poll() is None and time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.5)
        names = {d["name"]: d["id"] for d in httpx.get(f"{api}/datasets").json()}
        model = next(m["id"] for m in httpx.get(f"{api}/models").json())
        query = {
            "model": model,
            "train": names["digits-train"],
            "test": {"dataset": names["digits-test"], "indices": [0]},
            "solver": {"name": "cg", "tol": 1e-2},  # the service path, not solver accuracy
        }
        job = httpx.post(f"{api}/influence", json=query).json()["job"]
        while (state := httpx.get(f"{api}/jobs/{job}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state["status"] == "succeeded", state["error"]
        ranking = httpx.get(f"{api}/influence/{job}/ranking", params={"limit": 5}).json()
        assert len(ranking["items"]) == 5 and ranking["total"] == len(demo[1])
        assert (data_dir / "redis" / "appendonly.aof").exists()
        children = _children(server.pid)
        assert len(children) >= 2  # the embedded redis-server and one worker
    finally:
        server.send_signal(signal.SIGTERM)  # what process managers send
        assert server.wait(timeout=60) == 128 + signal.SIGTERM
    assert not [pid for pid in children if _alive(pid)], "serve left child processes running"


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()
