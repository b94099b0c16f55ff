"""Artifact store (content addressing, atomic writes, id validation) and the per-tenant
registry of models and datasets (validated before anything is stored)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import models
from tests.worker.conftest import MLP_CONFIG, TENANT, checkpoint_bytes, dataset_bytes
from worker.store import ArtifactNotFoundError, ArtifactStore, InvalidArtifactIdError, Registry


def stored_files(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def test_put_is_content_addressed_and_idempotent(store: ArtifactStore) -> None:
    first = store.put_bytes(b"hello")
    assert first == hashlib.sha256(b"hello").hexdigest()
    assert store.put_bytes(b"hello") == first
    assert store.get_bytes(first) == b"hello" and store.exists(first)
    assert len(stored_files(store)) == 1
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    tid = store.put_tensors(tensors)
    assert store.put_tensors({k: v.clone() for k, v in tensors.items()}) == tid
    back = store.get_tensors(tid)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    assert store.delete(first) and not store.exists(first) and not store.delete(first)
    with pytest.raises(ArtifactNotFoundError, match=first):
        store.get_bytes(first)


def test_interrupted_write_leaves_nothing(store: ArtifactStore, monkeypatch) -> None:
    def crash(src: str, dst: str) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.put_bytes(b"partial")
    assert not store.exists(hashlib.sha256(b"partial").hexdigest())
    assert stored_files(store) == []  # no temporary file left either


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "ab/../../" + "0" * 55,
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "..",
        "",
        "0" * 62 + "/.",
    ],
)
def test_ids_that_are_not_hex_digests_are_refused(store: ArtifactStore, bad: str) -> None:
    for operation in (store.get_bytes, store.exists, store.delete, store.path):
        with pytest.raises(InvalidArtifactIdError, match="64 lowercase hex"):
            operation(bad)


def test_model_is_validated_before_anything_is_stored(
    registry: Registry, store: ArtifactStore, tmp_path: Path
) -> None:
    model = models.build(MLP_CONFIG)
    good = checkpoint_bytes(model, MLP_CONFIG, tmp_path)
    wrong_shape = {**MLP_CONFIG, "hidden": [7]}
    for weights, config in ((b"not safetensors at all", MLP_CONFIG), (good, wrong_shape)):
        with pytest.raises(models.CheckpointError):
            registry.put_model(TENANT, config, weights)
    assert stored_files(store) == [] and registry.list_models(TENANT) == []

    record = registry.put_model(TENANT, None, good, name="tiny")
    assert record["id"] == models.checkpoint_id(model, MLP_CONFIG)
    assert record["architecture"] == "mlp" and record["name"] == "tiny"
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    loaded, config = registry.load_model(TENANT, record["id"])
    assert config == MLP_CONFIG
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_registry_is_per_tenant(registry: Registry, tmp_path: Path) -> None:
    data = models.Dataset(
        torch.randn(5, 4),
        torch.tensor([0, 1, 2, 0, 1]),
        {"task": "classification", "num_classes": 3},
    )
    record = registry.put_dataset(TENANT, dataset_bytes(data, tmp_path), name="five")
    assert record["id"] == data.id and record["size"] == 5 and record["name"] == "five"
    assert registry.get_dataset("tenant-b", data.id) is None
    assert registry.list_datasets("tenant-b") == []
    with pytest.raises(KeyError, match=data.id):
        registry.load_dataset("tenant-b", data.id)
    assert torch.equal(registry.load_dataset(TENANT, data.id).inputs, data.inputs)
    assert not registry.delete_dataset("tenant-b", data.id)
    assert registry.delete_dataset(TENANT, data.id)
    assert registry.get_dataset(TENANT, data.id) is None


def test_uploading_the_same_content_again_keeps_its_name(
    registry: Registry, tmp_path: Path
) -> None:
    """Re-uploading a file that is still registered, without a name, keeps the name it has;
    a name given renames it; a new record takes the file's own name."""
    data = models.Dataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), {"name": "file-name"})
    raw = dataset_bytes(data, tmp_path)
    assert registry.put_dataset(TENANT, raw)["name"] == "file-name"
    assert registry.put_dataset(TENANT, raw, name="train")["name"] == "train"
    assert registry.put_dataset(TENANT, raw)["name"] == "train"
    assert registry.get_dataset(TENANT, data.id)["name"] == "train"
    weights = checkpoint_bytes(models.build(MLP_CONFIG), MLP_CONFIG, tmp_path)
    model_id = registry.put_model(TENANT, None, weights, name="demo")["id"]
    assert registry.put_model(TENANT, None, weights)["name"] == "demo"
    assert registry.get_model(TENANT, model_id)["name"] == "demo"
    registry.delete_model(TENANT, model_id)
    assert registry.put_model(TENANT, None, weights)["name"] is None  # forgotten with it


def test_bad_dataset_is_refused(registry: Registry, store: ArtifactStore) -> None:
    with pytest.raises(models.DatasetError):
        registry.put_dataset(TENANT, b"\x00" * 32)
    assert stored_files(store) == []


def test_dataset_size_cap(registry: Registry, tmp_path: Path) -> None:
    registry.max_dataset_size = 3
    data = models.Dataset(torch.randn(5, 2), torch.zeros(5, 1), {"task": "regression"})
    with pytest.raises(models.DatasetError, match="over the cap of 3"):
        registry.put_dataset(TENANT, dataset_bytes(data, tmp_path))


def test_dataset_record_carries_the_tensor_layout_and_rows_read_alone(
    registry: Registry, store: ArtifactStore, tmp_path: Path
) -> None:
    data = models.Dataset(
        torch.randn(6, 2, 3), torch.randn(6, 2), {"task": "regression", "name": "vectors"}
    )
    record = registry.put_dataset(TENANT, dataset_bytes(data, tmp_path))
    assert record["tensors"] == {
        "inputs": {"shape": [2, 3], "dtype": "float32"},
        "targets": {"shape": [2], "dtype": "float32"},
    }
    metadata, layout = store.describe(record["artifact"])
    assert layout["inputs"] == {"shape": [6, 2, 3], "dtype": "float32"}
    assert "vectors" in metadata["metadata"]
    assert torch.equal(store.get_tensor(record["artifact"], "inputs", 4), data.inputs[4])
    assert torch.equal(store.get_tensor(record["artifact"], "targets"), data.targets)
    with pytest.raises(IndexError):
        store.get_tensor(record["artifact"], "inputs", 6)
    with pytest.raises(KeyError):
        store.get_tensor(record["artifact"], "weights")
