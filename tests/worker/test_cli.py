"""``influence-service`` around its workers: ``serve`` restarts a local worker process that
exits unexpectedly (and stops doing so on shutdown), runs each in a session of its own and
stops it when serve is gone; ``rank``/``query`` end with one clear line and a non-zero
status on an API error or a job that did not succeed, check their arguments against the
API's bounds before submitting anything, print the solver report, and start without
importing torch. (The whole process tree on a real Ctrl-C: tests/app/test_cli_process.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import app.cli
import app.client
import app.schemas
from app.cli import WorkerSupervisor, main
from app.client import ApiError
from app.routes import influence as influence_routes
from app.schemas import Item, JobAccepted, JobView, Ranking
from worker.__main__ import CONFIG_ERROR, DEVICE_FAILURE_EXIT

REPO = Path(__file__).resolve().parents[2]


def _exits(status: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({status})"]


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_supervisor_restarts_a_crashed_worker_with_backoff_until_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = WorkerSupervisor(  # e.g. a worker whose device failed
        _exits(DEVICE_FAILURE_EXIT), None, 1, poll_s=0.02, backoff_min=0.05, backoff_max=0.2
    )
    with caplog.at_level("WARNING", logger="influence-service"):
        supervisor.start()
        try:
            _until(lambda: supervisor.restarts >= 3)
        finally:
            supervisor.stop()
    assert "exited unexpectedly (status 3); restarting in 0.05 s" in caplog.text
    assert "restarting in 0.1 s" in caplog.text  # the backoff doubles
    restarts = supervisor.restarts
    time.sleep(0.4)
    assert supervisor.restarts == restarts  # no restarts after stop
    assert all(p.poll() is not None for p in supervisor.processes if p is not None)


def test_the_worker_command_names_itself_in_its_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["worker"])
    assert exit_.value.code == CONFIG_ERROR
    assert "influence-service worker: error: REDIS_URL is not set" in capsys.readouterr().err


@pytest.mark.parametrize("status", [0, CONFIG_ERROR])
def test_supervisor_leaves_stopped_and_misconfigured_workers_down(status: int) -> None:
    supervisor = WorkerSupervisor(_exits(status), None, 1, poll_s=0.02, backoff_min=0.01)
    supervisor.start()
    try:
        _until(lambda: supervisor.processes[0] is None)
        time.sleep(0.2)
    finally:
        supervisor.stop()
    assert supervisor.restarts == 0


def test_supervisor_stop_terminates_running_workers() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = WorkerSupervisor(sleeper, None, 2, poll_s=0.02).start()
    processes = list(supervisor.processes)
    time.sleep(0.1)
    assert all(p.poll() is None for p in processes)
    supervisor.stop()
    assert all(p.poll() is not None for p in processes) and supervisor.restarts == 0


class FakeClient:
    """Stands in for InfluenceClient: a failed job whose ranking the API refuses."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def job(self, job_id: str) -> SimpleNamespace:
        if job_id == "nope":
            raise ApiError(404, "job nope not found")
        return SimpleNamespace(id=job_id, status="failed", error="ValueError: bad test points")

    def ranking(self, *args, **kwargs) -> None:
        raise ApiError(409, [{"loc": ["path", "job"], "msg": "job failed:\nno scores"}])

    def models(self) -> list:
        raise ApiError(401, "missing or invalid API key")


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.client, "InfluenceClient", FakeClient)


def test_rank_of_a_failed_job_says_so(fake_client: None) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", "j1"])
    message = str(exit_info.value.code)
    assert message == "influence-service: error: job j1 failed: ValueError: bad test points"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["rank", "nope"], "HTTP 404: job nope not found"),
        (["query"], "HTTP 401: missing or invalid API key"),
    ],
)
def test_api_errors_end_the_cli_with_one_line(fake_client: None, argv, line: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == f"influence-service: error: {line}"


def test_api_error_details_become_one_line() -> None:
    detail = [{"loc": ["body", "test", 0], "msg": "bad\nrow"}, {"loc": [], "msg": "x"}]
    assert (
        app.cli._api_error_message(ApiError(422, detail)) == "HTTP 422: body.test.0: bad row; : x"
    )


def test_unreachable_service_ends_the_cli_with_one_line() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", "j1", "--url", "http://127.0.0.1:9"])  # nothing listens on port 9
    message = str(exit_info.value.code)
    assert message.startswith("influence-service: error: cannot reach the service at ")
    assert "http://127.0.0.1:9" in message and "\n" not in message


def test_supervised_workers_run_in_sessions_of_their_own() -> None:
    """A terminal's Ctrl-C goes to its foreground process group: a worker in serve's would
    stop in the middle of its job instead of being stopped by serve after it."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = WorkerSupervisor(sleeper, None, 1, poll_s=0.02).start()
    try:
        (process,) = supervisor.processes
        assert process is not None and os.getsid(process.pid) != os.getsid(0)
    finally:
        supervisor.stop()


def test_supervisor_stop_waits_for_the_job_unless_hurried() -> None:
    """stop() SIGTERMs and waits (the worker finishes its job); a second Ctrl-C (hurry)
    kills a worker that is still busy."""
    busy = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); print(flush=True); time.sleep(60)"]  # fmt: skip
    supervisor = WorkerSupervisor(busy, None, 1, poll_s=0.02)
    supervisor._spawn = lambda: subprocess.Popen(busy, stdout=subprocess.PIPE)  # type: ignore[method-assign]
    supervisor.start()
    (process,) = supervisor.processes
    assert process is not None and process.stdout is not None
    process.stdout.readline()  # SIGTERM is ignored from here on
    hurry = threading.Event()
    stopper = threading.Thread(target=supervisor.stop, kwargs={"timeout": 60, "hurry": hurry})
    began = time.monotonic()
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive() and process.poll() is None  # still waiting for its job
    hurry.set()
    stopper.join(5)
    assert not stopper.is_alive() and process.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 5


def test_a_local_worker_stops_when_serve_is_gone() -> None:
    """serve killed hard (SIGKILL) cannot stop its workers: each watches its parent and
    SIGTERMs itself (it finishes its job, then exits) once the parent is gone."""
    child = (
        "import app.cli, os, signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        "app.cli._stop_with_parent(os.getppid(), 0.05); print('watching', flush=True); "
        "time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=sys.stdout); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    serve = subprocess.Popen(
        [sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert serve.stdout is not None
    worker = int(serve.stdout.readline())
    assert serve.stdout.readline() == "watching\n"
    serve.kill()
    serve.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and "State:\tZ" not in _status(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "State:\tZ"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "--damping", "nan"], "argument --damping: must be a finite number, got nan"),
        (["query", "--damping=-inf"], "argument --damping: must be a finite number"),
        (["query", "--damping", "1e400"], "argument --damping: must be a finite number"),
        (["query", "--damping", "0"], "argument --damping: must be in (0, 1e+06], got 0"),
        (["query", "--limit", "5000"], "argument --limit: must be an integer in [1, 1000]"),
        (["query", "--limit", "-3"], "argument --limit: must be an integer in [1, 1000]"),
        (["query", "--indices", "-1"], "argument --indices: must be an integer in [0, "),
        (["query", "--indices", *map(str, range(257))], "at most 256 test rows per query"),
        (["rank", "j1", "--limit", "0"], "argument --limit: must be an integer in [1, 1000]"),
        (["rank", "j1", "--test", "256"], "argument --test: must be an integer in [0, 255]"),
        (["rank", "j1", "--offset", "-1"], "argument --offset: must be an integer in [0, "),
        (["serve", "--workers", "-1"], "argument --workers: must be an integer ≥ 0"),
    ],
)
def test_arguments_outside_the_apis_bounds_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv, message: str
) -> None:
    """Checked before anything is submitted: a bad --limit used to fail only after the job
    ran, and nan/inf ended in a traceback from the JSON encoder."""

    def no_client(*args, **kwargs):
        raise AssertionError("the service was contacted")

    monkeypatch.setattr(app.client, "InfluenceClient", no_client)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bounds_are_the_apis() -> None:
    hints = typing.get_type_hints(influence_routes.ranking, include_extras=True)
    limit = {type(m).__name__: m for m in hints["limit"].__metadata__[0].metadata}
    assert (limit["Ge"].ge, limit["Le"].le) == (1, app.cli.MAX_RANKING_LIMIT)
    offset = {type(m).__name__: m for m in hints["offset"].__metadata__[0].metadata}
    assert offset["Le"].le == app.cli.MAX_OFFSET
    assert app.cli.MAX_TEST_POINTS == app.schemas.MAX_TEST_POINTS
    damping = {type(m).__name__: m for m in app.schemas.Damping.__metadata__[0].metadata}
    assert (damping["Gt"].gt, damping["Le"].le) == (0, app.cli.MAX_DAMPING)


def test_cli_starts_without_torch() -> None:
    """--help and argument errors import no torch, uvicorn or worker code (~3.7 s before)."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "for argv in (['--help'], ['query', '--help'], ['query', '--limit', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'uvicorn', 'fastapi', 'redis', 'worker', 'influence', 'models'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


REPORT = {
    "method": "cg",
    "iterations": 72,
    "seconds": 0.4,
    "relative_residual": 4.01e-06,
    "converged": True,
}


def _view(kind: str = "influence", status: str = "succeeded") -> JobView:
    return JobView(
        id="j1", kind=kind, status=status, progress=1.0, phase="done", attempts=1,
        max_attempts=3, created=0.0, payload={}, report=REPORT, cached=True,
    )  # fmt: skip


class RankingClient(FakeClient):
    """A service that answers every query from the cache."""

    kind = "influence"

    def job(self, job_id: str) -> JobView:
        return _view(self.kind)

    def models(self) -> list:
        return [SimpleNamespace(name=app.cli.DEMO_MODEL_NAME, id="m1")]

    def datasets(self) -> list:
        return [SimpleNamespace(name=n, id=n) for n in ("digits-train", "digits-test")]

    def influence(self, request: dict) -> JobView:
        return _view()

    def ranking(self, job: str, *, test: int = 0, direction: str = "helpful", **kw) -> Ranking:
        items = [Item(index=5, score=0.25, target=3), Item(index=9, score=0.125, target=1)]
        return Ranking(
            job=job, test=test, direction=direction, items=items, total=1437, offset=0,
            report=REPORT, meaning="self-influence ..." if self.kind != "influence" else "m",
        )  # fmt: skip


@pytest.mark.parametrize("argv", [["query"], ["rank", "j1"]])
def test_query_and_rank_print_the_solver_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setattr(app.client, "InfluenceClient", RankingClient)
    main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "solver: cg, 72 iterations, relative residual 4.01e-06, converged: yes"
    assert any(line.startswith("test point 0") for line in out)


class JoiningClient(RankingClient):
    """A service whose identical query is already running: the submit joins that job."""

    def influence(self, request: dict) -> JobAccepted:
        return JobAccepted(job="j1", status="running")

    def wait(self, job: str, progress: Callable[[JobView], None] | None = None) -> JobView:
        return _view()


def test_query_that_joins_a_running_job_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(app.client, "InfluenceClient", JoiningClient)
    main(["query"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "job j1 running (joined)"
    assert "queued" not in out[0]


def test_rank_of_a_self_influence_job_says_what_is_ranked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(RankingClient, "kind", "self_influence")
    monkeypatch.setattr(app.client, "InfluenceClient", RankingClient)
    main(["rank", "j1"])
    out = capsys.readouterr().out
    assert "highest self-influence of 1437 training points" in out
    assert "test point" not in out and "most helpful" not in out
    main(["rank", "j1", "--direction", "harmful"])
    assert "lowest self-influence of 1437 training points" in capsys.readouterr().out


def test_report_line_without_a_report_or_unconverged() -> None:
    assert app.cli._report_line(None) == "solver: no report"
    line = app.cli._report_line({**REPORT, "method": "lissa", "converged": False})
    assert line == "solver: lissa, 72 iterations, relative residual 4.01e-06, converged: NO"


@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_the_progress_bar_ends_with_a_newline(
    capsys: pytest.CaptureFixture[str], ending: str
) -> None:
    class Waiting:
        def wait(self, job: str, progress) -> JobView:
            for fraction in (0.0, 0.4):
                progress(SimpleNamespace(progress=fraction, status="running", phase="solve"))
            if ending == "raises":
                raise KeyboardInterrupt
            final = _view()
            progress(final)
            return final

    with contextlib.suppress(KeyboardInterrupt):
        app.cli._follow(Waiting(), "j1")  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.endswith("\n") and "solve" in err
