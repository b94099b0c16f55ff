"""Bad input and abuse over real HTTP: keys, tenants, size caps, bounds, rate limits,
hostile checkpoints and file names."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

import models
from app.cli import main as cli_main
from app.client import ApiError
from tests.app.conftest import API_KEYS, LM_CONFIG, LiveServer, WorkerThreads, dataset_bytes
from tests.models.test_checkpoints import CORPUS
from worker.settings import Settings
from worker.store import ArtifactStore

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def _artifacts(settings: Settings) -> list[Path]:
    root = settings.data_dir / "artifacts"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic key-alice"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "unknown", "wrong-scheme", "empty"],
)
def test_wrong_or_missing_key_is_401(live: LiveServer, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/models"), ("GET", "/jobs"), ("POST", "/influence")]:
        response = httpx.request(method, live.url + path, headers=headers, json={})
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(live.url + "/healthz").status_code == 200  # probes need no key


def test_another_tenants_ids_are_404(live: LiveServer, uploaded: dict[str, str]) -> None:
    with live.client("key-alice") as alice:
        job = alice.influence(
            {
                "model": uploaded["model"],
                "train": uploaded["train"],
                "test": {"dataset": uploaded["test"], "indices": [0]},
            }
        )
    url = live.url
    checks = [
        ("GET", f"/models/{uploaded['model']}", None),
        ("DELETE", f"/models/{uploaded['model']}", None),
        ("GET", f"/datasets/{uploaded['train']}", None),
        ("GET", f"/datasets/{uploaded['test']}/items/0.png", None),
        ("GET", f"/jobs/{job.job}", None),
        ("DELETE", f"/jobs/{job.job}", None),
        ("GET", f"/jobs/{job.job}/events", None),
        ("GET", f"/influence/{job.job}/ranking", None),
        (
            "POST",
            "/influence",
            {
                "model": uploaded["model"],
                "train": uploaded["train"],
                "test": {"dataset": uploaded["test"], "indices": [0]},
            },
        ),
    ]
    for method, path, body in checks:
        response = httpx.request(method, url + path, headers=BOB, json=body)
        assert response.status_code == 404, (method, path, response.text)
    assert httpx.get(url + "/models", headers=BOB).json() == []
    assert httpx.get(url + "/jobs", headers=BOB).json()["items"] == []
    # ... and alice still has everything bob tried to delete
    assert httpx.get(url + f"/models/{uploaded['model']}", headers=ALICE).status_code == 200
    assert httpx.get(url + f"/jobs/{job.job}", headers=ALICE).json()["status"] == "queued"


@pytest.fixture
def small_caps(settings_factory: Callable[..., Settings]) -> Iterator[LiveServer]:
    server = LiveServer(
        settings_factory(
            api_keys=API_KEYS, max_upload_bytes=4096, max_body_bytes=2048, max_test_points=2
        )
    ).start()
    yield server
    server.stop()


def test_oversize_bodies_are_413_with_and_without_content_length(small_caps: LiveServer) -> None:
    payload = b"\0" * 10_000
    sized = httpx.post(
        small_caps.url + "/models", headers=ALICE, files={"weights": ("w.safetensors", payload)}
    )
    assert sized.status_code == 413 and "4096 bytes" in sized.json()["detail"]
    assert "INFLUENCE_MAX_UPLOAD_BYTES" in sized.json()["detail"]

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"\0" * 1000

    chunked = httpx.post(
        small_caps.url + "/datasets",
        headers={**ALICE, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=chunks(),
    )
    assert chunked.status_code == 413
    big_json = httpx.post(
        small_caps.url + "/influence",
        headers={**ALICE, "Content-Type": "application/json"},
        content=(b'{"model": "' + b"a" * 4000 + b'"}' for _ in range(1)),
    )
    assert big_json.status_code == 413
    assert "2048 bytes (INFLUENCE_MAX_BODY_BYTES)" in big_json.json()["detail"]
    assert _artifacts(small_caps.settings) == []
    assert httpx.get(small_caps.url + "/models", headers=ALICE).json() == []


def test_deployment_cap_on_test_points_is_422(small_caps: LiveServer) -> None:
    body = {
        "model": "a" * 64,
        "train": "b" * 64,
        "test": {"dataset": "c" * 64, "indices": [0, 1, 2]},
    }
    response = httpx.post(small_caps.url + "/influence", headers=ALICE, json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "test", "dataset", "indices"]
    assert "at most 2" in response.json()["detail"][0]["msg"]


def test_bad_checkpoint_corpus_is_rejected_and_nothing_stored(
    live: LiveServer, workers: WorkerThreads, settings: Settings
) -> None:
    workers.start(settings)
    for case, (make, fragments) in sorted(CORPUS.items()):
        response = httpx.post(
            live.url + "/models", headers=ALICE, files={"weights": ("ckpt.safetensors", make())}
        )
        assert response.status_code == 400, case
        detail = response.json()["detail"]
        assert all(fragment in detail for fragment in fragments), (case, detail)
    assert httpx.get(live.url + "/models", headers=ALICE).json() == []
    assert _artifacts(settings) == []
    assert workers.alive()
    assert httpx.get(live.url + "/healthz").json()["workers"] == 1


def test_uploaded_file_names_never_reach_the_file_system(
    live: LiveServer, settings: Settings, demo, tmp_path: Path
) -> None:
    checkpoint, _, test = demo
    hostile = "../../../../../../tmp/escaped-influence-upload.safetensors"
    model = httpx.post(
        live.url + "/models", headers=ALICE, files={"weights": (hostile, checkpoint.read_bytes())}
    )
    dataset = httpx.post(
        live.url + "/datasets",
        headers=ALICE,
        files={"file": (hostile, dataset_bytes(test, tmp_path))},
        data={"name": "../../etc/passwd"},
    )
    assert model.status_code == 201 and dataset.status_code == 201
    assert not Path("/tmp/escaped-influence-upload.safetensors").exists()
    stored = _artifacts(settings)
    assert stored and all(len(p.name) == 64 and int(p.name, 16) >= 0 for p in stored)
    assert all(
        p.resolve().is_relative_to((settings.data_dir / "artifacts").resolve()) for p in stored
    )
    for bad_id in ["..%2F..%2Fetc%2Fpasswd", "....//....//etc"]:
        assert httpx.get(f"{live.url}/datasets/{bad_id}", headers=ALICE).status_code == 404


def _query(uploaded: dict[str, str], **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": uploaded["model"],
        "train": uploaded["train"],
        "test": {"dataset": uploaded["test"], "indices": [0]},
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"damping": 0}, ["body", "damping"]),
        ({"damping": -1.0}, ["body", "damping"]),
        ({"weight_decay": -1.0}, ["body", "weight_decay"]),
        ({"solver": {"name": "lissa", "depth": 100_000, "repeats": 100}}, ["body", "solver"]),
        ({"solver": {"name": "cg", "max_iter": 0}}, ["body", "solver", "max_iter"]),
        ({"solver": {"name": "cg", "tol": 2.0}}, ["body", "solver", "tol"]),
        ({"test": {"dataset": "ab" * 32, "indices": list(range(257))}}, ["body", "test"]),
        ({"test": {"dataset": "ab" * 32, "indices": [-1]}}, ["body", "test"]),
        (
            {"test": {"inputs": [[0.0] * 63], "targets": [1]}},
            ["body", "test", "inline", "inputs", 0],
        ),
        (
            {"test": {"inputs": [[0.0] * 64], "targets": [10]}},
            ["body", "test", "inline", "targets", 0],
        ),
        (
            {"test": {"inputs": [[0.0] * 64], "targets": [1.5]}},
            ["body", "test", "inline", "targets", 0],
        ),
        (
            {"test": {"inputs": [[0.0] * 64] * 2, "targets": [1, [1, 2]]}},
            ["body", "test", "inline", "targets", 1],
        ),
        ({"loss": "hinge"}, ["body", "loss"]),
    ],
)
def test_out_of_range_fields_are_422_naming_the_field(
    live: LiveServer, uploaded: dict[str, str], changes: dict[str, object], loc: list[object]
) -> None:
    response = httpx.post(live.url + "/influence", headers=ALICE, json=_query(uploaded, **changes))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(error["loc"][: len(loc)] == loc for error in errors), errors


def test_out_of_range_query_parameters_are_422(live: LiveServer, uploaded: dict[str, str]) -> None:
    with live.client() as client:
        job = client.influence(_query(uploaded))
    for params, name in [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"direction": "sideways"}, "direction"),
    ]:
        response = httpx.get(
            f"{live.url}/influence/{job.job}/ranking", headers=ALICE, params=params
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", name]
    verify = httpx.post(f"{live.url}/influence/{job.job}/verify", headers=ALICE, json={"top": 0})
    assert verify.status_code == 422 and verify.json()["detail"][0]["loc"] == ["body", "top"]


@pytest.fixture
def limited(settings_factory: Callable[..., Settings]) -> Iterator[LiveServer]:
    """The API with a burst of 3 requests per bucket, refilling at one every 2 s."""
    server = LiveServer(
        settings_factory(api_keys=API_KEYS, rate_limit_per_s=0.5, rate_limit_burst=3)
    ).start()
    yield server
    server.stop()


def test_rate_limit_is_429_with_retry_after(limited: LiveServer) -> None:
    codes = [httpx.get(limited.url + "/models", headers=ALICE) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert int(codes[-1].headers["Retry-After"]) >= 1
    # buckets are per key: bob is unaffected by alice's burst
    assert httpx.get(limited.url + "/models", headers=BOB).status_code == 200


def test_guessing_keys_is_rate_limited_too(limited: LiveServer) -> None:
    wrong = {"Authorization": "Bearer not-a-key"}
    codes = [httpx.get(limited.url + "/models", headers=wrong) for _ in range(4)]
    assert [r.status_code for r in codes] == [401, 401, 401, 429]
    assert int(codes[-1].headers["Retry-After"]) >= 1
    # a refused guess does not spend a real key's tokens
    assert httpx.get(limited.url + "/models", headers=ALICE).status_code == 200


def test_serve_refuses_public_bind_without_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("INFLUENCE_API_KEYS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert "refusing to bind to 0.0.0.0" in str(exit_info.value.code)
    assert not (tmp_path / "redis").exists()  # nothing was started


def test_client_raises_api_error_with_detail(live: LiveServer) -> None:
    with live.client() as client, pytest.raises(ApiError) as err:
        client.model("0" * 64)
    assert err.value.status == 404 and "not found" in err.value.detail


@pytest.mark.parametrize(
    ("changes", "loc", "fragment"),
    [
        ({"recipe": {"optimizer": "rmsprop"}}, ["body", "recipe"], "optimizer 'rmsprop'"),
        ({"arguments": {"num_points": 10_000}}, ["body", "arguments"], "num_points = 10000"),
        ({"response": {"lbfgs_steps": 10**6}}, ["body", "response"], "lbfgs_steps"),
        ({"response": {"damping": 1.0}}, ["body", "response"], "top level"),
        ({"response": {"device": "cuda"}}, ["body", "response"], "worker's (INFLUENCE_DEVICE)"),
        ({"correlation": {"num_test": 5}}, ["body", "correlation"], "needs test points"),
        ({"damping": 0.0}, ["body", "damping"], "greater than 0"),
        (
            {"arguments": {"num_points": 200}, "response": {"epochs": 2000}},
            ["body"],
            "(arguments.num_points (200) × 4 responses) × response.epochs (2000) = 1600000",
        ),
        (  # an L-BFGS step is lbfgs_max_iter passes: 1 × 4 × 500 × 1000
            {
                "recipe": {"optimizer": "lbfgs", "epochs": 1000, "lbfgs_max_iter": 1000},
                "arguments": {"num_points": 1},
            },
            ["body"],
            "× recipe.epochs / 2 (500) × recipe.lbfgs_max_iter (1000) = 2000000",
        ),
        (
            {"recipe": {"optimizer": "lbfgs", "lbfgs_max_iter": 10**12}},
            ["body", "recipe"],
            "recipe.lbfgs_max_iter = 1000000000000 exceeds 1000",
        ),
        (
            {"recipe": {"optimizer": "lbfgs", "lbfgs_history": 10**9}},
            ["body", "recipe"],
            "recipe.lbfgs_history = 1000000000 exceeds 1000",
        ),
        (
            {"recipe": {"schedule": "step", "milestones": list(range(101))}},
            ["body", "recipe"],
            "the number of recipe.milestones = 101 exceeds 100",
        ),
        ({"response": {"cg_max_iter": 10**9}}, ["body", "response"], "response.cg_max_iter"),
        (
            {"response": {"solver": "lissa", "lissa_depth": 10**5, "lissa_repeats": 100}},
            ["body", "response"],
            "response.lissa_depth × response.lissa_repeats = 10000000 exceeds 1000000",
        ),
        ({"mislabel": {"fraction": 2}}, ["body", "mislabel"], "fraction must be in (0, 1)"),
        ({"mislabel": {"bogus": 1}}, ["body", "mislabel"], "unknown key(s) ['bogus']"),
        (
            {
                "arguments": {"num_points": 1},
                "response": {"epochs": 5000},
                "mislabel": {"pbrf_points": 200},
            },
            ["body"],
            "mislabel.pbrf_points (200) × response.epochs (5000)",
        ),
        (
            {"test": {"dataset": "c" * 64, "indices": [0]}, "correlation": {"methods": ["cold"]}},
            ["body", "correlation"],
            "correlation.methods: 'cold' needs the recorded training run",
        ),
    ],
)
def test_decomposition_settings_are_checked_at_the_edge(
    live: LiveServer, changes: dict[str, object], loc: list[str], fragment: str
) -> None:
    body = {"model": "a" * 64, "train": "b" * 64, "recipe": {"optimizer": "adam", "lr": 0.01}}
    body.update(changes)
    response = httpx.post(live.url + "/decompositions", headers=ALICE, json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and fragment in e["msg"] for e in errors), errors


def test_decomposition_mislabel_needs_a_classification_set(
    live: LiveServer, uploaded: dict[str, str], tmp_path: Path
) -> None:
    regression = models.Dataset(torch.randn(8, 64), torch.randn(8, 1), {"task": "regression"})
    with live.client() as client:
        record = client.upload_dataset(dataset_bytes(regression, tmp_path), name="values")
    body = {
        "model": uploaded["model"],
        "train": record.id,
        "recipe": {"optimizer": "adam", "lr": 0.01},
        "mislabel": {"fraction": 0.1},
    }
    response = httpx.post(live.url + "/decompositions", headers=ALICE, json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "mislabel"] and "classification" in error["msg"]


def test_event_stream_takes_the_key_in_the_header_only(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    with live.client() as client:
        job = client.influence(_query(uploaded))
        client.cancel(job.job)
    url = f"{live.url}/jobs/{job.job}/events"
    # keys never travel in URLs (logs, browser history): the query parameter is ignored
    assert httpx.get(url, params={"api_key": "key-alice"}).status_code == 401
    assert httpx.get(url, headers=BOB).status_code == 404
    stream = httpx.get(url, headers=ALICE)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in stream.text and '"status":"canceled"' in stream.text


@pytest.fixture
def token_model(live: LiveServer, tmp_path: Path) -> dict[str, str]:
    """A tiny language model (vocabulary 11) and a token dataset, uploaded by alice."""
    path = tmp_path / "lm.safetensors"
    models.save_checkpoint(path, models.build(LM_CONFIG), LM_CONFIG)
    tokens = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    data = models.Dataset(tokens[:, :4], tokens[:, 1:], {"task": "language_modeling"})
    with live.client() as client:
        model = client.upload_model(path)
        train = client.upload_dataset(dataset_bytes(data, tmp_path))
    return {"model": model.id, "train": train.id}


@pytest.mark.parametrize(
    ("inputs", "targets", "loc", "fragment"),
    [
        ([1.5, 2, 3, 4], [2, 3, 4, 5], ["inputs", 0], "integer token ids in [0, 11)"),
        ([1, 2, 3, 11], [2, 3, 4, 5], ["inputs", 0], "integer token ids in [0, 11)"),
        ([1, 2, 3, 4], [2, 3, 4], ["targets", 0], "training targets have 4 per example"),
        ([1, 2, 3, 4], [2, 3, 4, 11], ["targets", 0], "class index in [0, 11)"),
        ([1, 2, 3, 4], 2, ["targets", 0], "has 1 value(s)"),
    ],
    ids=["fraction", "out-of-vocabulary", "short-targets", "target-class", "scalar-target"],
)
def test_inline_token_points_are_checked_before_the_cast(
    live: LiveServer,
    token_model: dict[str, str],
    inputs: list,
    targets: object,
    loc: list,
    fragment: str,
) -> None:
    body = {**token_model, "test": {"inputs": [inputs], "targets": [targets]}}
    response = httpx.post(live.url + "/influence", headers=ALICE, json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "test", "inline", *loc] and fragment in error["msg"], error


def test_valid_inline_token_points_are_queued(
    live: LiveServer, token_model: dict[str, str], settings: Settings
) -> None:
    body = {**token_model, "test": {"inputs": [[1, 2, 3, 4]], "targets": [[2, 3, 4, 5]]}}
    response = httpx.post(live.url + "/influence", headers=ALICE, json=body)
    assert response.status_code == 202, response.text
    with live.client() as client:
        artifact = client.job(response.json()["job"]).payload["test"]["artifact"]
    stored = ArtifactStore.for_settings(settings).get_tensors(artifact)
    assert stored["inputs"].dtype == torch.int64 and stored["inputs"].tolist() == [[1, 2, 3, 4]]
    assert stored["targets"].tolist() == [[2, 3, 4, 5]]


@pytest.mark.parametrize("path", ["/models", "/datasets"])
def test_uploads_without_a_valid_key_are_refused_before_the_body_is_read(
    live: LiveServer, path: str
) -> None:
    """The key is checked first: a client that announces 60 MiB and sends 1 KiB of it
    gets its 401 at once (the model route used to read the whole form first)."""
    host, port = live.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer wrong-key\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {60 * 2**20}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head.encode() + b"--b\r\n" + b"x" * 1024)  # and nothing more
        try:
            reply = conn.recv(4096).decode(errors="replace")
        except TimeoutError:
            reply = "no answer within 10 s: the server is waiting for the body"
    assert reply.startswith("HTTP/1.1 401"), reply


@pytest.mark.parametrize(
    ("path", "request_args", "status", "fragment"),
    [
        ("/models", {"files": {"name": (None, "x")}}, 422, "weights: a safetensors file upload"),
        ("/models", {"files": {"weights": (None, "text")}}, 422, "weights: a safetensors file"),
        ("/models", {"json": {"weights": "x"}}, 415, "multipart/form-data (field 'weights')"),
        ("/models", {"files": {"weights": ("w", b"x")}, "data": {"name": "n" * 101}}, 422, "name"),
        ("/datasets", {"files": {"name": (None, "x")}}, 422, "file: a safetensors file upload"),
        ("/datasets", {"content": b"x"}, 415, "multipart/form-data (field 'file')"),
    ],
)
def test_malformed_upload_forms_name_the_field(
    live: LiveServer, settings: Settings, path: str, request_args: dict, status: int, fragment: str
) -> None:
    response = httpx.post(live.url + path, headers=ALICE, **request_args)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert httpx.get(live.url + path, headers=ALICE).json() == []
