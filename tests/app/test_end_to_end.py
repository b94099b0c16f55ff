"""End to end through HTTP: upload, query, follow progress, rank, cache, restart.

The reference is ``influence.InfluenceEngine`` run in this process on the same checkpoint,
data and solver settings: the service must return exactly the engine's scores (up to
float32 summation order), ranked the right way round.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import models
from app.client import ApiError
from app.routes import jobs as jobs_routes
from app.schemas import JobAccepted, JobView
from influence import CG, InfluenceEngine
from tests.app.conftest import LiveServer, WorkerThreads
from tests.conftest import RTOL_F32
from worker.queue import JobCanceledError, JobQueue
from worker.settings import Settings

SOLVER = {"name": "cg", "tol": 1e-6, "max_iter": 500}
TEST_ROWS = [0, 1, 2]


def _reference(demo: tuple[Path, models.Dataset, models.Dataset]) -> torch.Tensor:
    checkpoint, train, test = demo
    model, _ = models.load_checkpoint(checkpoint)
    engine = InfluenceEngine(model, loss="cross_entropy", train=(train.inputs, train.targets))
    idx = torch.tensor(TEST_ROWS)
    result = engine.scores(
        test=(test.inputs[idx], test.targets[idx]), solver=CG(tol=1e-6, max_iter=500)
    )
    return result.scores


def _full_ranking(client, job: str, row: int, direction: str) -> tuple[list[int], list[float]]:
    """All N items, read in pages of 1000 (the limit's bound)."""
    indices: list[int] = []
    scores: list[float] = []
    while True:
        page = client.ranking(job, test=row, direction=direction, limit=1000, offset=len(indices))
        indices += [item.index for item in page.items]
        scores += [item.score for item in page.items]
        if len(indices) >= page.total:
            return indices, scores


def test_query_ranks_training_points_like_the_engine(
    live: LiveServer,
    workers: WorkerThreads,
    settings: Settings,
    uploaded: dict[str, str],
    demo: tuple[Path, models.Dataset, models.Dataset],
) -> None:
    workers.start(settings)
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": TEST_ROWS},
        "solver": SOLVER,
    }
    with live.client() as client:
        accepted = client.influence(query)
        assert isinstance(accepted, JobAccepted) and accepted.status == "queued"
        assert "removed" in accepted.meaning and "1/N" in accepted.meaning
        seen: list[JobView] = []
        final = client.wait(accepted.job, timeout=120, progress=seen.append)
        assert final.status == "succeeded", final.error
        progress = [view.progress for view in seen]
        assert progress == sorted(progress) and progress[-1] == 1.0
        assert final.report is not None and final.report["method"] == "cg"

        reference = _reference(demo)
        _, train, _ = demo
        for row in range(len(TEST_ROWS)):
            indices, scores = _full_ranking(client, accepted.job, row, "helpful")
            assert sorted(indices) == list(range(len(train)))
            assert scores == sorted(scores, reverse=True)
            by_index = torch.zeros(len(train))
            by_index[torch.tensor(indices)] = torch.tensor(scores)
            scale = reference[row].abs().max()
            torch.testing.assert_close(by_index, reference[row], rtol=0, atol=RTOL_F32 * scale)
            harmful = client.ranking(accepted.job, test=row, direction="harmful", limit=3)
            assert harmful.items[0].index == int(reference[row].argmin())
            assert harmful.items[0].score < 0
            assert harmful.items[0].target == int(train.targets[harmful.items[0].index])
        torch.testing.assert_close(client.scores(accepted.job), reference, rtol=0, atol=1e-7)

        jobs_before = len(client.jobs().items)
        again = client.influence(query)
        assert isinstance(again, JobView)  # HTTP 200: the stored result, no job
        assert again.cached and again.id == accepted.job and again.status == "succeeded"
        assert len(client.jobs().items) == jobs_before
        assert "influence_cache_hits_total 1.0" in client.metrics()


def test_inline_test_points_give_the_same_scores(
    live: LiveServer,
    workers: WorkerThreads,
    settings: Settings,
    uploaded: dict[str, str],
    demo: tuple[Path, models.Dataset, models.Dataset],
) -> None:
    workers.start(settings)
    _, _, test = demo
    inline = {
        "inputs": test.inputs[TEST_ROWS].tolist(),
        "targets": test.targets[TEST_ROWS].tolist(),
    }
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": inline,
        "solver": SOLVER,
    }
    with live.client() as client:
        job = client.influence(query)
        assert isinstance(job, JobAccepted)
        assert client.wait(job.job, timeout=120).status == "succeeded"
        reference = _reference(demo)
        scale = reference.abs().max()
        torch.testing.assert_close(client.scores(job.job), reference, rtol=0, atol=RTOL_F32 * scale)


def test_api_restart_mid_job_keeps_the_job(
    settings: Settings,
    workers: WorkerThreads,
    demo: tuple[Path, models.Dataset, models.Dataset],
    tmp_path: Path,
) -> None:
    from tests.app.conftest import dataset_bytes

    checkpoint, train, test = demo
    first = LiveServer(settings).start()
    try:
        with first.client() as client:
            model = client.upload_model(checkpoint).id
            train_id = client.upload_dataset(dataset_bytes(train, tmp_path)).id
            test_id = client.upload_dataset(dataset_bytes(test, tmp_path)).id
            query = {
                "model": model,
                "train": train_id,
                "test": {"dataset": test_id, "indices": [5, 6]},
                "solver": SOLVER,
            }
            job = client.influence(query)
            assert isinstance(job, JobAccepted)
            workers.start(settings)
            assert client.job(job.job).status in ("queued", "running")
    finally:
        first.stop()
    second = LiveServer(settings).start()
    try:
        with second.client() as client:
            final = client.wait(job.job, timeout=120)
            assert final.status == "succeeded", final.error
            ranking = client.ranking(job.job, test=1, limit=5)
            assert len(ranking.items) == 5 and ranking.total == len(train)
    finally:
        second.stop()


def test_cancel_a_queued_job(live: LiveServer, uploaded: dict[str, str]) -> None:
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [9]},
    }
    with live.client() as client:
        job = client.influence(query)
        assert isinstance(job, JobAccepted)
        assert client.cancel(job.job).status == "canceled"
        assert client.job(job.job).status == "canceled"
        with pytest.raises(ApiError) as err:
            client.ranking(job.job)
        assert err.value.status == 409 and "canceled" in str(err.value.detail)


def test_an_idle_event_stream_keeps_alive_and_ends_when_the_server_stops(
    live: LiveServer, uploaded: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_routes, "KEEP_ALIVE_MS", 1000)
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [12]},
    }
    with live.client() as client:
        job = client.influence(query).job  # no worker: it stays queued, its stream idle
    lines: list[str] = []

    def read() -> None:
        url = f"{live.url}/jobs/{job}/events"
        with httpx.stream("GET", url, headers={"Authorization": "Bearer key-alice"}) as answer:
            lines.extend(answer.iter_lines())

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(2.8)
    assert reader.is_alive()
    live.server.config.app.state.services.stopping.set()  # what serve does on Ctrl-C
    reader.join(timeout=5)
    assert not reader.is_alive(), "the stream did not end when the server began to stop"
    assert lines.count(": keep-alive") >= 1, lines
    assert sum(line.startswith("event: progress") for line in lines) == 1  # the queued event
    assert not any(line.startswith("event: done") for line in lines)


def test_canceling_a_running_job_is_shown_until_its_worker_stops(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue
) -> None:
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [11]},
    }
    with live.client() as client:
        job = client.influence(query)
        assert not client.job(job.job).cancel_requested
        claim = queue.claim("test-runner", block_ms=0)  # a worker took it, mid-computation
        assert claim is not None and claim.job_id == job.job
        asked = client.cancel(job.job)
        assert asked.status == "running" and asked.cancel_requested
        assert client.job(job.job).cancel_requested
        with pytest.raises(JobCanceledError):  # the worker's next progress report stops it
            queue.report_progress(claim, 0.5, "scoring")
        queue.finish_canceled(claim)
        final = client.job(job.job)
    assert final.status == "canceled"


def test_dataset_items_and_thumbnails(live: LiveServer, uploaded: dict[str, str], demo) -> None:
    _, _, test = demo
    with live.client() as client:
        item = client.dataset_item(uploaded["test"], 4)
        assert item.target == int(test.targets[4]) and item.label == str(item.target)
        png = client.thumbnail(uploaded["test"], 4)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with pytest.raises(ApiError) as err:
            client.dataset_item(uploaded["test"], len(test))
        assert err.value.status == 404


def test_event_stream_resumed_after_the_last_event_ends_at_once(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [7]},
    }
    headers = {"Authorization": "Bearer key-alice"}
    with live.client() as client:
        job = client.influence(query)
        client.cancel(job.job)
    url = f"{live.url}/jobs/{job.job}/events"
    first = httpx.get(url, headers=headers, timeout=5)
    last_id = next(
        line.removeprefix("id: ") for line in first.text.splitlines() if line.startswith("id: ")
    )
    # a client that saw the final event reconnects: it gets `done` again, not keep-alives
    resumed = httpx.get(url, headers={**headers, "Last-Event-ID": last_id}, timeout=5)
    assert "event: done" in resumed.text and '"status":"canceled"' in resumed.text
    assert f"id: {last_id}" in resumed.text


@pytest.mark.parametrize(
    "last_id", ["99999999999999999999999-0", "0-18446744073709551616", "1-2-3", "abc"]
)
def test_an_event_stream_id_redis_cannot_take_is_422(
    live: LiveServer, uploaded: dict[str, str], last_id: str
) -> None:
    """Each part of a stream id is a 64-bit unsigned integer: a longer one passed the
    header's pattern and broke the stream mid-response (Redis: Invalid stream ID)."""
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [6]},
    }
    with live.client() as client:
        job = client.influence(query)  # no worker: it stays queued
    url = f"{live.url}/jobs/{job.job}/events"
    headers = {"Authorization": "Bearer key-alice", "Last-Event-ID": last_id}
    response = httpx.get(url, headers=headers, timeout=5)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "last-event-id"], error
