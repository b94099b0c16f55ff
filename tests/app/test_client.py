"""The Python client's ``wait``: ``timeout`` is a deadline for the whole wait, although
the server keeps the event stream alive and the client reconnects after dropped reads."""

from __future__ import annotations

import threading
import time

import pytest

from app.client import WaitTimeoutError
from app.schemas import JobAccepted, JobView
from tests.app.conftest import LiveServer, WorkerThreads


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


def test_wait_ranking_and_scores_take_the_answer_of_a_submission(
    live: LiveServer, uploaded: dict[str, str], workers: WorkerThreads
) -> None:
    """The documented ``job = client.influence(...); client.wait(job)``: a new query answers
    a queued JobAccepted (``.job``), the same query again the cached JobView (``.id``);
    every job method takes either, or the id."""
    workers.start(live.settings)
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [5]},
        "solver": {"name": "cg", "tol": 1e-2},
    }
    with live.client() as client:
        queued = client.influence(query)
        assert isinstance(queued, JobAccepted)
        final = client.wait(queued, timeout=120)
        assert final.status == "succeeded" and final.id == queued.job
        cached = client.influence(query)
        assert isinstance(cached, JobView) and cached.cached and cached.id == queued.job
        seen: list[JobView] = []
        assert client.wait(cached, timeout=5, progress=seen.append) is cached  # no request
        assert seen == [cached]
        for job in (queued, cached, queued.job):
            assert client.job(job).id == queued.job
            assert client.ranking(job, limit=3).job == queued.job
        assert tuple(client.scores(cached).shape) == (1, final.result["num_train"])


def test_both_answers_of_a_submission_have_a_job_id() -> None:
    accepted = JobAccepted(job="j1", status="queued")
    view = JobView(
        id="j2", kind="influence", status="succeeded", progress=1.0, phase="done",
        attempts=1, max_attempts=3, created=0.0, payload={},
    )  # fmt: skip
    assert (accepted.job_id, view.job_id) == ("j1", "j2")
    assert "job_id" not in accepted.model_dump() and "job_id" not in view.model_dump()
