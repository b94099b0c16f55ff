"""Bodies the API must refuse with a 422 that names the field, never a 500: non-finite
numbers (JSON's 1e400, NaN, Infinity), seeds past 64 bits, a LiSSA scale past its cap,
and malformed JSON. The answer carries loc/msg/type only, never the rejected input."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.app.conftest import LiveServer

ALICE = {"Authorization": "Bearer key-alice", "Content-Type": "application/json"}
QUERY = {"model": "a" * 64, "train": "b" * 64, "test": {"dataset": "c" * 64, "indices": [0]}}
RECIPE = {"optimizer": "adam", "lr": 0.01}


def _raw(body: dict[str, object], literal: str) -> str:
    """``body`` as JSON text with the value ``"@"`` replaced by a bare ``literal`` (1e400,
    NaN, Infinity: what json.dumps would never write, and what Python's json reads as a
    non-finite float)."""
    return json.dumps(body).replace('"@"', literal)


def _post(live: LiveServer, path: str, content: str | bytes) -> httpx.Response:
    return httpx.post(live.url + path, headers=ALICE, content=content)


@pytest.mark.parametrize(
    ("path", "body", "literal", "loc"),
    [
        ("/influence", {**QUERY, "solver": {"name": "lissa", "scale": "@"}}, "1e400",
         ["body", "solver", "scale"]),
        ("/influence", {**QUERY, "damping": "@"}, "1e400", ["body", "damping"]),
        ("/influence", {**QUERY, "damping": "@"}, "NaN", ["body", "damping"]),
        ("/influence", {**QUERY, "weight_decay": "@"}, "-Infinity", ["body", "weight_decay"]),
        ("/influence", {**QUERY, "solver": {"name": "cg", "tol": "@"}}, "NaN",
         ["body", "solver", "tol"]),
        ("/influence", {**QUERY, "test": {"inputs": [["@"]], "targets": [0]}}, "Infinity",
         ["body", "test"]),
        ("/self-influence", {"model": "a" * 64, "train": "b" * 64, "damping": "@"}, "1e400",
         ["body", "damping"]),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64, "recipe": RECIPE,
         "damping": "@"}, "NaN", ["body", "damping"]),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64,
         "recipe": {**RECIPE, "momentum": "@"}}, "1e400", ["body", "recipe"]),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64, "recipe": RECIPE,
         "response": {"lr": "@"}}, "Infinity", ["body", "response"]),
        # another field is wrong; the non-finite value elsewhere must not turn it into a 500
        ("/influence", {**QUERY, "loss": "hinge", "extra": "@"}, "Infinity", ["body", "loss"]),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_422_naming_the_field(
    live: LiveServer, path: str, body: dict[str, object], literal: str, loc: list[object]
) -> None:
    response = _post(live, path, _raw(body, literal))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(error["loc"][: len(loc)] == loc for error in errors), errors
    assert all(set(error) == {"loc", "msg", "type"} for error in errors), errors


@pytest.mark.parametrize(
    ("path", "body", "loc", "fragment"),
    [
        ("/influence", {**QUERY, "solver": {"name": "lissa", "seed": 2**70}},
         ["body", "solver", "seed"], "less than or equal to 9223372036854775807"),
        ("/influence", {**QUERY, "solver": {"name": "lissa", "scale": 1e13}},
         ["body", "solver", "scale"], "less than or equal to"),
        ("/self-influence", {"model": "a" * 64, "train": "b" * 64,
         "solver": {"name": "lissa", "seed": -1}}, ["body", "solver", "seed"], "greater than"),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64,
         "recipe": {**RECIPE, "seed": 2**70}}, ["body", "recipe"], "recipe.seed"),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64, "recipe": RECIPE,
         "arguments": {"seed": 2**64}}, ["body", "arguments"], "arguments.seed"),
        ("/decompositions", {"model": "a" * 64, "train": "b" * 64, "recipe": RECIPE,
         "mislabel": {"seed": 2**63}}, ["body", "mislabel"], "mislabel.seed"),
    ],
)  # fmt: skip
def test_seeds_and_the_lissa_scale_are_bounded(
    live: LiveServer, path: str, body: dict[str, object], loc: list[str], fragment: str
) -> None:
    response = _post(live, path, json.dumps(body))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and fragment in e["msg"] for e in errors), errors


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b'{"builtin": ', "json_invalid"),
        (b'{"builtin": "digits", "split": NaN}', "literal_error"),
        (b"\xff\xfe not json", "json_invalid"),
    ],
)
def test_malformed_dataset_json_is_422_without_the_input(
    live: LiveServer, content: bytes, kind: str
) -> None:
    response = _post(live, "/datasets", content)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["type"] == kind and e["loc"][0] == "body" for e in errors), errors
    assert all("input" not in e for e in errors)


def test_malformed_query_json_is_422(live: LiveServer) -> None:
    response = _post(live, "/influence", b'{"model": "' + b"a" * 64)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_solver_fields_must_apply_to_the_named_solver(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    """A field another solver reads is refused (one computation, one payload); ``tol``
    is read by both CG and LiSSA, so LiSSA keeps the value given."""
    query = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [0]},
    }
    response = _post(
        live, "/influence", json.dumps({**query, "solver": {"name": "cg", "depth": 77}})
    )
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [(e["loc"], "applies only to solver.name 'lissa'" in e["msg"]) for e in errors] == [
        (["body", "solver", "depth"], True)
    ], errors

    lissa = {**query, "solver": {"name": "lissa", "tol": 1e-3}}
    response = _post(live, "/influence", json.dumps(lissa))
    assert response.status_code == 202, response.text
    job = httpx.get(f"{live.url}/jobs/{response.json()['job']}", headers=ALICE).json()
    assert job["payload"]["solver"]["name"] == "lissa", job
    assert job["payload"]["solver"]["tol"] == 1e-3, job
