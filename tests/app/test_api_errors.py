"""Error answers a user meets, over real HTTP: test points reported for the shape the
request meant only, ids that are names, counts past the training set caught at submit,
jobs whose inputs were deleted, jobs of the wrong kind, and the ``meaning`` of each kind.

Jobs are finished by hand through the queue (no worker) where a test needs one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import models
from tests.app.conftest import LiveServer, dataset_bytes, finish_influence_job
from worker.contract import SCORE_MEANING, SELF_INFLUENCE_MEANING
from worker.queue import JobQueue
from worker.settings import Settings

ALICE = {"Authorization": "Bearer key-alice"}
FAKE = {"model": "a" * 64, "train": "b" * 64}
RECIPE = {"optimizer": "adam", "lr": 0.01, "epochs": 20}
SMALL = {"response": {"optimizer": "lbfgs", "lbfgs_steps": 2}}


def _post(live: LiveServer, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(live.url + path, headers=ALICE, json=body, timeout=30)


def _errors(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


# -- test points: one shape's errors only ------------------------------------------------


@pytest.mark.parametrize(
    ("test", "loc", "fragment"),
    [
        ({"dataset": "c" * 64, "indices": list(range(300))}, ["body", "test", "dataset", "indices"],
         "at most 256"),
        ({"dataset": "c" * 64}, ["body", "test", "dataset", "indices"], "required"),
        ({"inputs": [[1.0, 2.0]]}, ["body", "test", "inline", "targets"], "required"),
        ({"inputs": [[1.0]], "targets": [0, 1]}, ["body", "test", "inline"], "has 1 rows"),
        ("rows 0-3", ["body", "test"], "{inputs, targets}"),
    ],
)  # fmt: skip
def test_test_point_errors_name_only_the_meant_shape(
    live: LiveServer, test: Any, loc: list[str], fragment: str
) -> None:
    errors = _errors(_post(live, "/influence", {**FAKE, "test": test}))
    assert [error["loc"] for error in errors] == [loc], errors
    assert fragment in errors[0]["msg"], errors
    text = str(errors)
    assert "function-after" not in text and "InlineTest" not in text and "DatasetTest" not in text


@pytest.mark.parametrize(
    ("path", "test", "loc", "fragment"),
    [
        ("/influence", {"indices": [999]}, ["body", "test", "dataset", "indices"],
         "[999] out of range"),
        ("/influence", {"inputs": [[0.0]], "targets": [0]},
         ["body", "test", "inline", "inputs", 0], "has 1 values"),
        ("/influence", {"inputs": [[0.0] * 64], "targets": [12]},
         ["body", "test", "inline", "targets", 0], "class index in [0, 10)"),
        # a decomposition's test points are dataset rows only: no shape in its locs
        ("/decompositions", {"indices": [999]}, ["body", "test", "indices"], "[999] out of range"),
    ],
)  # fmt: skip
def test_submit_time_test_point_errors_name_the_meant_shape_too(
    live: LiveServer,
    uploaded: dict[str, str],
    path: str,
    test: dict[str, Any],
    loc: list[Any],
    fragment: str,
) -> None:
    """The checks against the stored data report under the same loc as the schema's."""
    if "indices" in test:
        test = {"dataset": uploaded["test"], **test}
    body = {"model": uploaded["model"], "train": uploaded["train"], "test": test}
    if path == "/decompositions":
        body.update(recipe=RECIPE, **SMALL)
    (error,) = _errors(_post(live, path, body))
    assert error["loc"] == loc and fragment in error["msg"], error


@pytest.mark.parametrize("field", ["model", "train"])
def test_a_name_for_an_id_says_what_an_id_is(live: LiveServer, field: str) -> None:
    body = {**FAKE, field: "demo-digits-mlp", "test": {"dataset": "c" * 64, "indices": [0]}}
    (error,) = _errors(_post(live, "/influence", body))
    listing = "GET /models" if field == "model" else "GET /datasets"
    assert error["loc"] == ["body", field] and listing in error["msg"], error
    assert "content id" in error["msg"] and "pattern" not in error["msg"], error


# -- decompositions: errors under the field they are about --------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"correlation": {"num_points": 2, "num_test": 2, "methods": ["warm"]}},
         "needs test points"),
        ({"test": {"dataset": "c" * 64, "indices": [0, 1]},
          "correlation": {"num_test": 2, "methods": ["warm", "cold"]}}, "'cold'"),
        ({"test": {"dataset": "c" * 64, "indices": [0, 1]},
          "correlation": {"num_test": 3, "methods": ["warm"]}}, "correlation.num_test = 3"),
    ],
)  # fmt: skip
def test_correlation_errors_are_under_correlation(
    live: LiveServer, extra: dict[str, Any], fragment: str
) -> None:
    (error,) = _errors(_post(live, "/decompositions", {**FAKE, "recipe": RECIPE, **extra}))
    assert error["loc"] == ["body", "correlation"] and fragment in error["msg"], error


def test_correlation_methods_default_to_those_a_checkpoint_can_run(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    """Left out, correlation.methods is the library's default without 'cold' (no recorded
    training run), not a 422 about a method the request never named."""
    body = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "recipe": RECIPE,
        **SMALL,
        "arguments": {"num_points": 2},
        "test": {"dataset": uploaded["test"], "indices": [0, 1]},
        "correlation": {"num_points": 2, "num_test": 2},
    }
    response = _post(live, "/decompositions", body)
    assert response.status_code == 202, response.text
    job = httpx.get(f"{live.url}/jobs/{response.json()['job']}", headers=ALICE).json()
    assert job["payload"]["correlation"]["methods"] == ["warm", "pbrf", "two_stage"], job


@pytest.fixture
def small_train(live: LiveServer, demo, tmp_path: Path, uploaded: dict[str, str]) -> str:
    """The first 50 rows of the demo's training set, uploaded by alice."""
    _, train, _ = demo
    rows = models.Dataset(train.inputs[:50], train.targets[:50], train.metadata)
    with live.client() as client:
        return client.upload_dataset(dataset_bytes(rows, tmp_path), name="train-50").id


@pytest.mark.parametrize(
    ("changes", "loc", "fragment"),
    [
        ({"arguments": {"num_points": 100}}, ["body", "arguments", "num_points"],
         "arguments.num_points = 100 exceeds the 50 examples"),
        ({"test": "demo", "correlation": {"num_points": 51, "num_test": 2, "methods": ["warm"]}},
         ["body", "correlation", "num_points"], "correlation.num_points = 51 exceeds the 50"),
        ({"mislabel": {"fraction": 0.1, "pbrf_points": 60}}, ["body", "mislabel", "pbrf_points"],
         "mislabel.pbrf_points = 60 exceeds the 50"),
        ({"mislabel": {"fraction": 0.005}}, ["body", "mislabel", "fraction"], "corrupts no label"),
    ],
)  # fmt: skip
def test_counts_past_the_training_set_are_422_at_submit(
    live: LiveServer,
    uploaded: dict[str, str],
    small_train: str,
    changes: dict[str, Any],
    loc: list[str],
    fragment: str,
) -> None:
    body = {"model": uploaded["model"], "train": small_train, "recipe": RECIPE, **SMALL, **changes}
    if body.get("test") == "demo":
        body["test"] = {"dataset": uploaded["test"], "indices": [0, 1]}
    (error,) = _errors(_post(live, "/decompositions", body))
    assert error["loc"] == loc and fragment in error["msg"], error
    # at the bound it is accepted
    body["arguments"] = {"num_points": 50}
    body.pop("correlation", None)
    body.pop("mislabel", None)
    assert _post(live, "/decompositions", body).status_code == 202


# -- jobs of another kind, deleted inputs, meanings ----------------------------------------


def test_each_kind_says_what_it_means_and_the_wrong_kind_is_409(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    engine = {"model": uploaded["model"], "train": uploaded["train"]}
    query = {**engine, "test": {"dataset": uploaded["test"], "indices": [0]}}
    influence = _post(live, "/influence", query).json()
    assert influence["meaning"] == SCORE_MEANING
    self_influence = _post(live, "/self-influence", engine).json()
    assert self_influence["meaning"] == SELF_INFLUENCE_MEANING
    decomposition = _post(live, "/decompositions", {**engine, "recipe": RECIPE, **SMALL})
    assert decomposition.status_code == 202 and decomposition.json()["meaning"] is None
    job = decomposition.json()["job"]
    shown = httpx.get(f"{live.url}/jobs/{job}", headers=ALICE).json()
    assert shown["kind"] == "decomposition" and shown["meaning"] is None

    for response in (
        httpx.get(f"{live.url}/influence/{job}/ranking", headers=ALICE),
        httpx.get(f"{live.url}/influence/{job}/scores", headers=ALICE),
        _post(live, f"/influence/{job}/verify"),
    ):
        assert response.status_code == 409, response.text
        assert f"job {job} is a decomposition job" in response.json()["detail"]
    # verify needs an influence job: a self-influence one (finished or not) is the wrong kind
    response = _post(live, f"/influence/{self_influence['job']}/verify")
    assert response.status_code == 409, response.text
    assert "is a self_influence job; verifications exist for influence jobs" in response.text
    assert _post(live, f"/influence/{'f' * 32}/verify").status_code == 404  # no such job


def test_a_job_whose_training_set_was_deleted(
    live: LiveServer, uploaded: dict[str, str], queue: JobQueue, settings: Settings, demo
) -> None:
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [0, 1]},
    }
    job = _post(live, "/influence", query).json()["job"]
    finish_influence_job(queue, settings, job, len(demo[1]))
    ranking = httpx.get(f"{live.url}/influence/{job}/ranking", headers=ALICE).json()
    assert ranking["warning"] is None and ranking["items"][0]["target"] is not None

    train = uploaded["train"]
    assert httpx.delete(f"{live.url}/datasets/{train}", headers=ALICE).status_code == 204
    response = _post(live, f"/influence/{job}/verify")
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert f"training set {train} was deleted" in detail and "Upload the same file" in detail

    ranking = httpx.get(f"{live.url}/influence/{job}/ranking", headers=ALICE)
    assert ranking.status_code == 200
    body = ranking.json()
    assert all(item["target"] is None for item in body["items"])
    assert f"training set {train} was deleted" in body["warning"]
