"""The Python client's ``wait``: ``timeout`` is a deadline for the whole wait, although
the server keeps the event stream alive and the client reconnects after dropped reads."""

from __future__ import annotations

import threading
import time

import pytest

from app.client import WaitTimeoutError
from app.schemas import JobAccepted, JobView
from tests.app.conftest import LiveServer


def _queued(live: LiveServer, uploaded: dict[str, str], row: int) -> str:
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [row]},
    }
    with live.client() as client:
        job = client.influence(query)
    assert isinstance(job, JobAccepted)
    return job.job


@pytest.mark.parametrize("timeout", [1.5, 12.0], ids=["below-keep-alive", "above-keep-alive"])
def test_wait_gives_up_at_its_deadline(
    live: LiveServer, uploaded: dict[str, str], timeout: float
) -> None:
    job = _queued(live, uploaded, 3)  # no worker: it stays queued
    outcome: list[BaseException | JobView] = []

    def wait() -> None:
        with live.client() as client:
            try:
                outcome.append(client.wait(job, timeout=timeout))
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

    began = time.monotonic()
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(timeout + 10)
    took = time.monotonic() - began
    assert not thread.is_alive(), f"wait(timeout={timeout}) still waiting after {took:.1f} s"
    (error,) = outcome
    assert isinstance(error, WaitTimeoutError) and isinstance(error, TimeoutError), error
    assert error.job_id == job and error.timeout == timeout
    assert job in str(error) and f"{timeout:g} s" in str(error)
    assert timeout <= took < timeout + 3


def test_wait_returns_a_finished_job_at_once(live: LiveServer, uploaded: dict[str, str]) -> None:
    job = _queued(live, uploaded, 4)
    seen: list[JobView] = []
    with live.client() as client:
        client.cancel(job)
        began = time.monotonic()
        final = client.wait(job, timeout=30, progress=seen.append)
    assert final.status == "canceled" and time.monotonic() - began < 5
    assert seen and seen[-1].status == "canceled"
