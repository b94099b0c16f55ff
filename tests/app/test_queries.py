"""Submitting queries over real HTTP: the submit-time compatibility check of model,
dataset and loss, de-duplication of identical queries in flight, verify's test row,
score matrices served from the artifact file, and a result whose artifact went missing.

Jobs are finished by hand through the queue (no worker), so each test is quick."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import safetensors.torch
import torch

import models
from app.services import IN_FLIGHT_PENDING_TTL_S, Services
from tests.app.conftest import LM_CONFIG, LiveServer, dataset_bytes
from tests.app.conftest import finish_influence_job as _finish
from worker.cache import result_key
from worker.contract import JobKind
from worker.queue import JobQueue
from worker.settings import Settings
from worker.store import ArtifactStore

ALICE = {"Authorization": "Bearer key-alice"}


def _query(uploaded: dict[str, str], **changes: Any) -> dict[str, Any]:
    return {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [0, 1]},
        **changes,
    }


def _post(live: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(live.url + path, headers=ALICE, json=body, timeout=30)


# -- compatibility of model, dataset and loss ---------------------------------------------


@pytest.fixture
def narrow_model(live: LiveServer, tmp_path: Path) -> str:
    """An MLP that takes 30 features (the digits rows have 64)."""
    config = {"architecture": "mlp", "in_features": 30, "out_features": 10}
    path = tmp_path / "narrow.safetensors"
    models.save_checkpoint(path, models.build(config), config)
    with live.client() as client:
        return client.upload_model(path).id


@pytest.mark.parametrize(
    ("path", "changes", "loc", "fragment"),
    [
        ("/influence", {"loss": "mse"}, ["body", "loss"], "gives 10 value(s) per example"),
        ("/influence", {"loss": "bce"}, ["body", "loss"], "class labels: use cross_entropy"),
        ("/self-influence", {"loss": "mse"}, ["body", "loss"], "mse compares outputs"),
        (
            "/decompositions",
            {"recipe": {"optimizer": "adam", "lr": 0.01, "loss": "bce"}},
            ["body", "recipe"],
            "bce compares outputs",
        ),
    ],
)
def test_a_loss_that_cannot_pair_outputs_with_targets_is_422(
    live: LiveServer,
    uploaded: dict[str, str],
    path: str,
    changes: dict[str, Any],
    loc: list[str],
    fragment: str,
) -> None:
    body = _query(uploaded, **changes)
    if path != "/influence":
        del body["test"]
    if path == "/decompositions":
        body.setdefault("recipe", {"optimizer": "adam", "lr": 0.01})
    response = _post(live, path, body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and fragment in error["msg"], error
    assert httpx.get(live.url + "/jobs", headers=ALICE).json()["items"] == []


def test_a_model_that_cannot_take_the_training_inputs_is_422(
    live: LiveServer, uploaded: dict[str, str], narrow_model: str
) -> None:
    response = _post(live, "/influence", _query(uploaded, model=narrow_model))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "train"], error
    assert "per-example shape [64]" in error["msg"] and "built for [30]" in error["msg"]


def test_a_huge_declared_input_size_is_checked_without_allocating_it(
    live: LiveServer, uploaded: dict[str, str], tmp_path: Path
) -> None:
    """resnet20's weights do not depend on image_size: a small checkpoint can declare
    2³¹−1-pixel images. The submit check reads the shape from the config (an input of
    that size cannot even be allocated: this was a 500)."""
    config = {"architecture": "resnet20", "image_size": 2**31 - 1, "width": 0.01}
    path = tmp_path / "huge.safetensors"
    models.save_checkpoint(path, models.build(config), config)
    with live.client() as client:
        huge = client.upload_model(path).id
    body = _query(uploaded, model=huge)
    del body["test"]
    response = _post(live, "/self-influence", body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "train"], error
    assert f"built for [3, {2**31 - 1}, {2**31 - 1}]" in error["msg"], error


def test_test_rows_unlike_the_training_set_are_422(
    live: LiveServer, uploaded: dict[str, str], tmp_path: Path
) -> None:
    wide = models.Dataset(torch.randn(4, 30), torch.tensor([0, 1, 0, 1]), {"task": "regression"})
    with live.client() as client:
        other = client.upload_dataset(dataset_bytes(wide, tmp_path), name="wide").id
    body = _query(uploaded, test={"dataset": other, "indices": [0]})
    response = _post(live, "/influence", body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "test", "dataset", "dataset"] and "[30]" in error["msg"], error


def test_compatible_losses_are_accepted(live: LiveServer, tmp_path: Path) -> None:
    """A binary logistic regression (one logit) takes bce on 0/1 labels but not
    cross_entropy; a regression MLP takes mse."""
    with live.client() as client:
        cancer = client.builtin_dataset("breast_cancer").id
        diabetes = client.builtin_dataset("diabetes").id
        ids = {}
        for name, config in {
            "logistic": {"architecture": "logistic_regression", "in_features": 30},
            "regressor": {"architecture": "mlp", "in_features": 10, "out_features": 1},
        }.items():
            path = tmp_path / f"{name}.safetensors"
            models.save_checkpoint(path, models.build(config), config)
            ids[name] = client.upload_model(path).id
    bce = {"model": ids["logistic"], "train": cancer, "loss": "bce"}
    assert _post(live, "/self-influence", bce).status_code == 202
    ce = _post(live, "/self-influence", {**bce, "loss": "cross_entropy"})
    assert ce.status_code == 422 and "2 classes but" in ce.json()["detail"][0]["msg"]
    mse = {"model": ids["regressor"], "train": diabetes, "loss": "mse"}
    assert _post(live, "/self-influence", mse).status_code == 202
    ce = _post(live, "/self-influence", {**mse, "loss": "cross_entropy"})
    assert ce.status_code == 422 and "regression" in ce.json()["detail"][0]["msg"]


def test_cross_entropy_on_real_valued_targets_is_refused_at_submit(
    live: LiveServer, uploaded: dict[str, str], tmp_path: Path
) -> None:
    """Real-valued targets are not class indices, whether or not the dataset says it is a
    regression set (the worker's loss would refuse them; the API says so first)."""
    generator = torch.Generator().manual_seed(0)
    real = models.Dataset(
        torch.rand(20, 64, generator=generator), torch.rand(20, generator=generator)
    )
    assert "task" not in real.metadata
    with live.client() as client:
        train = client.upload_dataset(dataset_bytes(real, tmp_path), name="real-targets").id
    body = {"model": uploaded["model"], "train": train, "loss": "cross_entropy"}
    response = _post(live, "/self-influence", body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "loss"] and "real-valued targets" in error["msg"], error


@pytest.fixture
def lm_model(live: LiveServer, tmp_path: Path) -> str:
    """A tiny language model (vocabulary 11, context 4), uploaded by alice."""
    path = tmp_path / "lm.safetensors"
    models.save_checkpoint(path, models.build(LM_CONFIG), LM_CONFIG)
    with live.client() as client:
        return client.upload_model(path).id


def _token_set(live: LiveServer, tmp_path: Path, length: int, target_length: int) -> str:
    """A token dataset of 6 sequences of ``length`` ids, targets of ``target_length``."""
    tokens = torch.randint(0, 11, (6, length + 1), generator=torch.Generator().manual_seed(0))
    data = models.Dataset(
        tokens[:, :length], tokens[:, 1 : target_length + 1], {"task": "language_modeling"}
    )
    with live.client() as client:
        name = f"tokens-{length}-{target_length}"
        return client.upload_dataset(dataset_bytes(data, tmp_path), name=name).id


def test_sequences_as_long_as_the_context_are_accepted_and_longer_ones_are_422(
    live: LiveServer, lm_model: str, tmp_path: Path
) -> None:
    context = LM_CONFIG["context_length"]
    full = _token_set(live, tmp_path, context, context)
    response = _post(live, "/self-influence", {"model": lm_model, "train": full})
    assert response.status_code == 202, response.text
    long = _token_set(live, tmp_path, context + 1, context + 1)
    response = _post(live, "/self-influence", {"model": lm_model, "train": long})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "train"], error
    assert f"at most {context} token ids" in error["msg"] and "[5]" in error["msg"], error


def test_sequence_targets_of_the_wrong_length_are_422(
    live: LiveServer, lm_model: str, tmp_path: Path
) -> None:
    """Outputs [4, 11] need targets [4]; targets [3] have the right rank but not the size."""
    short = _token_set(live, tmp_path, 4, 3)
    response = _post(live, "/self-influence", {"model": lm_model, "train": short})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "loss"], error
    assert "targets of shape [4]" in error["msg"] and "shape [3]" in error["msg"], error


# -- de-duplication of identical queries in flight -------------------------------------------


def test_identical_queries_in_flight_share_one_job(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue, settings: Settings, demo
) -> None:
    body = _query(uploaded)
    first = _post(live, "/influence", body)
    assert first.status_code == 202
    job = first.json()["job"]
    again = _post(live, "/influence", body)
    assert again.status_code == 202 and again.json() == first.json()
    # still the same job while it runs
    claim = queue.claim("test-worker", block_ms=0)
    assert claim is not None and claim.job_id == job
    running = _post(live, "/influence", body)
    assert running.status_code == 202
    assert running.json()["job"] == job and running.json()["status"] == "running"
    # a failed job is not joined: the query is submitted afresh
    queue.fail(claim, "boom", retry=False)
    retried = _post(live, "/influence", body)
    assert retried.status_code == 202 and retried.json()["job"] != job
    # ... and so is a canceled one
    httpx.delete(f"{live.url}/jobs/{retried.json()['job']}", headers=ALICE)
    fresh = _post(live, "/influence", body)
    assert fresh.status_code == 202
    assert fresh.json()["job"] not in (job, retried.json()["job"])
    # a different query is a different job
    other = _post(live, "/influence", _query(uploaded, damping=0.5))
    assert other.json()["job"] != fresh.json()["job"]
    listed = httpx.get(live.url + "/jobs", headers=ALICE).json()["items"]
    assert len(listed) == 4
    # once the job succeeded, the same query is answered from the result cache
    _, train, _ = demo
    _finish(queue, settings, fresh.json()["job"], len(train))
    cached = _post(live, "/influence", body)
    assert cached.status_code == 200 and cached.json()["id"] == fresh.json()["job"]


def test_a_running_job_asked_to_cancel_is_not_joined(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue
) -> None:
    """A job still running but asked to cancel will not deliver: the same query starts a
    new job instead of joining it."""
    body = _query(uploaded, damping=0.125)
    job = _post(live, "/influence", body).json()["job"]
    claim = queue.claim("test-worker", block_ms=0)
    assert claim is not None and claim.job_id == job
    assert httpx.delete(f"{live.url}/jobs/{job}", headers=ALICE).status_code < 300
    record = queue.get(job, "alice")
    assert record is not None and record.cancel_requested
    again = _post(live, "/influence", body)
    assert again.status_code == 202, again.text
    assert again.json()["job"] != job and again.json()["status"] == "queued"


def test_the_in_flight_link_lives_as_long_as_the_job_may(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue
) -> None:
    """After a submit the link names the job and lives for every attempt plus the queue
    allowance, not just the short pending TTL it is created with."""
    services: Services = live.server.config.app.state.services  # type: ignore[union-attr]
    job = _post(live, "/influence", _query(uploaded)).json()["job"]
    record = queue.get(job, "alice")
    assert record is not None and record.cache_key
    link = queue.keys.in_flight("alice", record.cache_key)
    assert queue.redis.get(link) == job
    ttl = queue.redis.ttl(link)
    assert services.in_flight_ttl - 60 <= ttl <= services.in_flight_ttl, ttl
    assert ttl > 10 * IN_FLIGHT_PENDING_TTL_S


def test_a_submit_that_fails_leaves_no_pending_link(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pending placeholder of a submit that raised (here Redis refusing the write) is
    removed at once, so the same query submitted again does not wait for it to expire."""
    services: Services = live.server.config.app.state.services  # type: ignore[union-attr]
    job = _post(live, "/influence", _query(uploaded)).json()["job"]
    payload = {**queue.get(job, "alice").payload, "damping": 0.75}

    def refused(*args: Any, **kwargs: Any) -> str:
        raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")

    monkeypatch.setattr(services.queue, "submit", refused)
    with pytest.raises(redis.exceptions.ReadOnlyError):
        services.submit_query("alice", JobKind.INFLUENCE, payload)
    link = queue.keys.in_flight("alice", result_key(JobKind.INFLUENCE, payload))
    assert queue.redis.get(link) is None


def test_concurrent_identical_queries_start_one_job(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    body = _query(uploaded, damping=0.25)
    answers: list[httpx.Response] = []
    start = threading.Barrier(6)

    def post() -> None:
        start.wait()
        answers.append(_post(live, "/influence", body))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.status_code for r in answers] == [202] * 6
    assert len({r.json()["job"] for r in answers}) == 1
    assert len(httpx.get(live.url + "/jobs", headers=ALICE).json()["items"]) == 1


# -- verify's test row, score files, missing artifacts ---------------------------------------


def test_verify_test_row_must_be_one_of_the_jobs(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue, settings: Settings, demo
) -> None:
    job = _post(live, "/influence", _query(uploaded)).json()["job"]
    _finish(queue, settings, job, len(demo[1]))
    url = f"{live.url}/influence/{job}/verify"
    response = httpx.post(url, headers=ALICE, json={"test": 2})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "test"] and "2 test point(s)" in error["msg"], error
    assert httpx.post(url, headers=ALICE, json={"test": 1}).status_code == 202


def test_scores_are_served_from_the_artifact_file(
    live: LiveServer,
    uploaded: dict[str, str],
    queue: JobQueue,
    settings: Settings,
    demo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = _post(live, "/influence", _query(uploaded)).json()["job"]
    artifact = _finish(queue, settings, job, len(demo[1]))
    services: Services = live.server.config.app.state.services  # type: ignore[union-attr]

    def refuse(_: str) -> bytes:
        raise AssertionError("the score matrix was read into memory")

    monkeypatch.setattr(services.store, "get_bytes", refuse)
    response = httpx.get(f"{live.url}/influence/{job}/scores", headers=ALICE)
    assert response.status_code == 200, response.text
    assert response.content == ArtifactStore.for_settings(settings).path(artifact).read_bytes()
    assert f'filename="{job}-scores.safetensors"' in response.headers["content-disposition"]
    assert safetensors.torch.load(response.content)["scores"].shape == (2, len(demo[1]))


def test_a_result_whose_artifact_is_missing_is_410_and_recomputed(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue, settings: Settings, demo
) -> None:
    body = _query(uploaded)
    job = _post(live, "/influence", body).json()["job"]
    artifact = _finish(queue, settings, job, len(demo[1]))
    page = f"{live.url}/influence/{job}/ranking?test=0"
    assert httpx.get(page, headers=ALICE).status_code == 200  # now held in the API's cache
    ArtifactStore.for_settings(settings).delete(artifact)
    for path in (
        f"/influence/{job}/scores",
        f"/influence/{job}/ranking?test=1",
        page[len(live.url) :],
    ):
        response = httpx.get(live.url + path, headers=ALICE)
        assert response.status_code == 410, (path, response.text)
        assert "missing from the artifact store" in response.json()["detail"]
    # the query is not answered from the cache with the lost result: it runs again,
    # and the metrics count a miss, not a hit
    counters = queue.counts()
    again = _post(live, "/influence", body)
    assert again.status_code == 202 and again.json()["job"] != job
    after = queue.counts()
    assert after.get("cache_hits", 0) == counters.get("cache_hits", 0)
    assert after["cache_misses"] == counters.get("cache_misses", 0) + 1
