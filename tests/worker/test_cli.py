"""``influence-service`` around its workers: ``serve`` restarts a local worker process that
exits unexpectedly (and stops doing so on shutdown); ``rank``/``query`` end with one clear
line and a non-zero status on an API error or a job that did not succeed."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

import app.cli
from app.cli import WorkerSupervisor, main
from app.client import ApiError
from worker.__main__ import CONFIG_ERROR


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
    supervisor = WorkerSupervisor(
        _exits(3), None, 1, poll_s=0.02, backoff_min=0.05, backoff_max=0.2
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
    monkeypatch.setattr(app.cli, "InfluenceClient", FakeClient)


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
