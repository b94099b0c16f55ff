"""Uploads whose metadata has the wrong JSON type are 400s naming the key, over real HTTP
(they were 500s: TypeErrors inside the validators), and nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import safetensors.torch
import torch

import models
from tests.app.conftest import LiveServer, dataset_bytes
from tests.models.test_checkpoints import CONFIG, _state
from tests.models.test_datasets import CORPUS as DATASET_CORPUS
from worker.settings import Settings

ALICE = {"Authorization": "Bearer key-alice"}


def _artifacts(settings: Settings) -> list[Path]:
    root = settings.data_dir / "artifacts"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_bad_dataset_corpus_is_400_naming_the_problem(live: LiveServer, settings: Settings) -> None:
    # includes metadata num_classes "2" / 2.5, class_names 5, input_shape "ab" / [[2]], name 5
    for case, (make, fragments) in sorted(DATASET_CORPUS.items()):
        response = httpx.post(
            live.url + "/datasets", headers=ALICE, files={"file": ("data.safetensors", make())}
        )
        assert response.status_code == 400, (case, response.text)
        detail = response.json()["detail"]
        assert all(fragment in detail for fragment in fragments), (case, detail)
    assert httpx.get(live.url + "/datasets", headers=ALICE).json() == []
    assert _artifacts(settings) == []


def test_malformed_model_config_is_400_naming_the_problem(
    live: LiveServer, settings: Settings
) -> None:
    weights = safetensors.torch.save(_state())  # no embedded config
    cases = [
        # (embedded metadata config, form config, fragment)
        ("5", None, "metadata 'config' must be a JSON object, got number"),
        ("[1]", None, "metadata 'config' must be a JSON object, got array"),
        ('"abc"', None, "metadata 'config' must be a JSON object, got string"),
        (json.dumps({**CONFIG, "architecture": ["mlp"]}), None, "must be a string, got list"),
        (None, json.dumps({**CONFIG, "architecture": ["mlp"]}), "must be a string, got list"),
        (None, json.dumps({**CONFIG, "hidden": [2**40]}), "'hidden' of mlp is over the limit"),
        # what json.loads raises besides JSONDecodeError (these were 500s)
        ("[" * 20_000, None, "metadata 'config' is not valid JSON (nested too deeply)"),
        (None, "[" * 20_000, "config: not valid JSON (nested too deeply)"),
        (None, "9" * 5_000, "config: not valid JSON (Exceeds the limit (4300 digits)"),
    ]
    for embedded, form, fragment in cases:
        data = (
            weights if embedded is None else safetensors.torch.save(_state(), {"config": embedded})
        )
        response = httpx.post(
            live.url + "/models",
            headers=ALICE,
            files={"weights": ("model.safetensors", data)},
            data={} if form is None else {"config": form},
        )
        assert response.status_code == 400, (embedded, form, response.text)
        assert fragment in response.json()["detail"], (embedded, form)
        assert "checkpoint: checkpoint" not in response.json()["detail"]
    assert httpx.get(live.url + "/models", headers=ALICE).json() == []
    assert _artifacts(settings) == []


def test_a_dataset_name_from_metadata_is_bounded_like_the_form_field(
    live: LiveServer, tmp_path: Path
) -> None:
    """A listing shows every name: one taken from the file's metadata is held to the
    form field's 100 characters (it could be megabytes, in every GET /datasets)."""
    x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    long = models.Dataset(x, y, {"task": "classification", "num_classes": 2, "name": "n" * 101})
    data = dataset_bytes(long, tmp_path)
    files = {"file": ("data.safetensors", data)}
    response = httpx.post(live.url + "/datasets", headers=ALICE, files=files)
    assert response.status_code == 400, response.text
    assert "metadata 'name' has 101 characters" in response.json()["detail"]
    named = httpx.post(live.url + "/datasets", headers=ALICE, files=files, data={"name": "short"})
    assert named.status_code == 201 and named.json()["name"] == "short"
