"""Content-addressed artifact store (a directory) and the per-tenant registry of models
and datasets (JSON records in Redis).

Artifacts are immutable files named by the sha256 of their bytes, written atomically
(temporary file in the same directory, fsync, ``os.replace``), so readers see a whole
file or none and two writers of the same content agree. Ids are checked to be 64 hex
digits before any path is built, so no id can name a file outside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import safetensors.torch
from torch import Tensor, nn

import models
from worker.contract import Keys
from worker.settings import Settings

__all__ = [
    "ArtifactNotFoundError",
    "ArtifactStore",
    "InvalidArtifactIdError",
    "Registry",
    "tensor_layout",
]

_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME_LENGTH = 100
"""Longest model or dataset name (a listing's label)."""
_SAFETENSORS_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "BOOL": "bool",
}


class InvalidArtifactIdError(ValueError):
    """An artifact id that is not 64 lowercase hex digits (e.g. a path)."""


class ArtifactNotFoundError(FileNotFoundError):
    """No artifact with this id in the store (e.g. deleted, or the volume is not shared)."""


class ArtifactStore:
    """Immutable blobs named by their sha256, under ``root/ab/abcdef…``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> ArtifactStore:
        """The deployment's store: ``settings.data_dir / "artifacts"``."""
        return cls(settings.data_dir / "artifacts")

    def path(self, artifact_id: str) -> Path:
        """Where ``artifact_id`` lives (validated: 64 hex digits, never a user path)."""
        if not isinstance(artifact_id, str) or not _ID.fullmatch(artifact_id):
            raise InvalidArtifactIdError(
                f"invalid artifact id {artifact_id!r}: expected 64 lowercase hex digits"
            )
        return self.root / artifact_id[:2] / artifact_id

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (no-op if present) and return its sha256 hex id."""
        artifact_id = hashlib.sha256(data).hexdigest()
        target = self.path(artifact_id)
        if target.exists():
            return artifact_id
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return artifact_id

    def put_tensors(
        self, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
    ) -> str:
        """Store tensors as safetensors (contiguous CPU copies); returns the id."""
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return self.put_bytes(safetensors.torch.save(cpu, metadata=metadata))

    def get_bytes(self, artifact_id: str) -> bytes:
        """The artifact's bytes; ArtifactNotFoundError if absent."""
        try:
            return self.path(artifact_id).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {artifact_id} is not in the store") from None

    def get_tensors(self, artifact_id: str) -> dict[str, Tensor]:
        """The tensors of a safetensors artifact written by ``put_tensors``."""
        return safetensors.torch.load(self.get_bytes(artifact_id))

    def get_tensor(self, artifact_id: str, name: str, row: int | None = None) -> Tensor:
        """One tensor of a safetensors artifact, or only its ``row`` (first index): read
        through a memory map, so a row of a large score matrix costs one row of I/O.
        ArtifactNotFoundError if absent; KeyError if it has no tensor ``name``;
        IndexError for a row out of range."""
        path = self.path(artifact_id)
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                if name not in handle.keys():  # noqa: SIM118 (a method, not a dict)
                    raise KeyError(f"artifact {artifact_id} has no tensor {name!r}")
                if row is None:
                    return handle.get_tensor(name)
                view = handle.get_slice(name)
                size = view.get_shape()[0]
                if not 0 <= row < size:
                    raise IndexError(f"row {row} out of range for {size} rows")
                return view[row : row + 1][0].clone()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {artifact_id} is not in the store") from None

    def describe(self, artifact_id: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """(file metadata, {tensor name: {"shape", "dtype"}}) of a safetensors artifact,
        from its header alone (no tensor data is read)."""
        try:
            with safetensors.safe_open(self.path(artifact_id), framework="pt") as handle:
                layout = {}
                for name in handle.keys():  # noqa: SIM118 (a method, not a dict)
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    layout[name] = {
                        "shape": list(view.get_shape()),
                        "dtype": _SAFETENSORS_DTYPES.get(dtype, dtype),
                    }
                return dict(handle.metadata() or {}), layout
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {artifact_id} is not in the store") from None

    def exists(self, artifact_id: str) -> bool:
        """Whether the artifact is in the store."""
        return self.path(artifact_id).exists()

    def delete(self, artifact_id: str) -> bool:
        """Remove the artifact; False if it was not there."""
        try:
            self.path(artifact_id).unlink()
        except FileNotFoundError:
            return False
        return True


def tensor_layout(dataset: models.Dataset) -> dict[str, dict[str, Any]]:
    """Per-example shape and dtype name of a dataset's tensors, e.g.
    ``{"inputs": {"shape": [64], "dtype": "float32"}, "targets": {"shape": [], ...}}``."""
    return {
        name: {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch.")}
        for name, tensor in (("inputs", dataset.inputs), ("targets", dataset.targets))
    }


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Registry:
    """Per-tenant records of uploaded models and datasets (Redis hashes id → JSON).

    Everything is validated by the ``models`` loaders before a byte is stored; stored names
    are content ids (``models.checkpoint_id``, ``Dataset.id``), never user file names.
    """

    def __init__(self, client: redis.Redis, settings: Settings, store: ArtifactStore) -> None:
        self.redis = client
        self.keys = Keys(settings.key_prefix)
        self.store = store
        self.max_dataset_size = settings.max_dataset_size

    # -- models ------------------------------------------------------------------------

    def put_model(
        self, tenant: str, config: dict[str, Any] | None, weights: bytes, name: str | None = None
    ) -> dict[str, Any]:
        """Validate a checkpoint (safetensors ``weights`` + ``config``, or a config embedded
        in the file) and register it for ``tenant``: {"id", "architecture", "parameters",
        "name", "size", "artifact"}. Invalid input raises models.CheckpointError."""
        model, config = models.load_checkpoint_bytes(weights, config)
        model_id = models.checkpoint_id(model, config)
        artifact, size = self._put_via_file(lambda p: models.save_checkpoint(p, model, config))
        record = {
            "id": model_id,
            "architecture": config["architecture"],
            "parameters": _count_parameters(model),
            "name": name,
            "size": size,
            "config": config,
            "artifact": artifact,
        }
        return self._save(self.keys.models(tenant), record)

    def get_model(self, tenant: str, model_id: str) -> dict[str, Any] | None:
        """The tenant's model record, or None."""
        raw = self.redis.hget(self.keys.models(tenant), model_id)
        return json.loads(raw) if raw else None

    def list_models(self, tenant: str) -> list[dict[str, Any]]:
        """Every model record of the tenant (no particular order)."""
        return [json.loads(v) for v in self.redis.hvals(self.keys.models(tenant))]

    def delete_model(self, tenant: str, model_id: str) -> bool:
        """Forget the tenant's record (the immutable artifact may be shared and stays)."""
        return bool(self.redis.hdel(self.keys.models(tenant), model_id))

    def load_model(self, tenant: str, model_id: str) -> tuple[nn.Module, dict[str, Any]]:
        """The tenant's model in eval mode and its config (KeyError naming the id if absent)."""
        record = self.get_model(tenant, model_id)
        if record is None:
            raise KeyError(f"model {model_id} not found")
        return models.load_checkpoint_bytes(self.store.get_bytes(record["artifact"]))

    # -- datasets ----------------------------------------------------------------------

    def put_dataset(self, tenant: str, data: bytes, name: str | None = None) -> dict[str, Any]:
        """Validate a dataset file (safetensors with ``inputs``, ``targets``) and register
        it: {"id", "size", "name", "task", "num_classes", "input_shape", "class_names",
        "tensors", "artifact"} (``tensors``: per-example shape and dtype of ``inputs`` and
        ``targets``, so the API can check test points without loading the data).
        Invalid input raises models.DatasetError."""
        return self._register_dataset(tenant, models.load_dataset_bytes(data), name)

    def put_builtin_dataset(self, tenant: str, name: str, split: str = "train") -> dict[str, Any]:
        """Register one of ``models.builtin_dataset``'s datasets (digits, …)."""
        dataset = models.builtin_dataset(name, split)
        return self._register_dataset(tenant, dataset, f"{name}-{split}")

    def _register_dataset(
        self, tenant: str, dataset: models.Dataset, name: str | None
    ) -> dict[str, Any]:
        if len(dataset) > self.max_dataset_size:
            raise models.DatasetError(
                f"dataset has {len(dataset)} examples, over the cap of {self.max_dataset_size} "
                "(INFLUENCE_MAX_DATASET_SIZE)"
            )
        meta = dataset.metadata
        if name is None and len(meta.get("name") or "") > MAX_NAME_LENGTH:
            raise models.DatasetError(
                f"metadata 'name' has {len(meta['name'])} characters, over the "
                f"{MAX_NAME_LENGTH} a listing shows; give a shorter name with the upload"
            )
        artifact, _ = self._put_via_file(lambda path: models.save_dataset(path, dataset))
        record = {
            "id": dataset.id,
            "size": len(dataset),
            "name": name,
            "task": meta.get("task"),
            "num_classes": meta.get("num_classes"),
            "input_shape": meta.get("input_shape") or list(dataset.inputs.shape[1:]),
            "class_names": meta.get("class_names"),
            "tensors": tensor_layout(dataset),
            "artifact": artifact,
        }
        return self._save(self.keys.datasets(tenant), record, meta.get("name"))

    def get_dataset(self, tenant: str, dataset_id: str) -> dict[str, Any] | None:
        """The tenant's dataset record, or None."""
        raw = self.redis.hget(self.keys.datasets(tenant), dataset_id)
        return json.loads(raw) if raw else None

    def list_datasets(self, tenant: str) -> list[dict[str, Any]]:
        """Every dataset record of the tenant (no particular order)."""
        return [json.loads(v) for v in self.redis.hvals(self.keys.datasets(tenant))]

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        """Forget the tenant's record (the artifact may be shared and stays); False if
        there was none."""
        return bool(self.redis.hdel(self.keys.datasets(tenant), dataset_id))

    def load_dataset(self, tenant: str, dataset_id: str) -> models.Dataset:
        """The tenant's dataset (KeyError naming the id if absent)."""
        record = self.get_dataset(tenant, dataset_id)
        if record is None:
            raise KeyError(f"dataset {dataset_id} not found")
        return models.load_dataset_bytes(self.store.get_bytes(record["artifact"]))

    # -- helpers -----------------------------------------------------------------------

    def _save(
        self, key: str, record: dict[str, Any], default_name: str | None = None
    ) -> dict[str, Any]:
        """Store ``record`` under its id in the registry hash ``key``. Without a name given,
        re-uploading content that is still registered keeps the name it has (a deleted
        record's name is gone with it), else the record takes ``default_name``."""
        if record["name"] is None:
            previous = self.redis.hget(key, record["id"])
            record["name"] = (json.loads(previous) if previous else {}).get("name") or (
                default_name
            )
        self.redis.hset(key, record["id"], json.dumps(record))
        return record

    def _put_via_file(self, write: Callable[[Path], None]) -> tuple[str, int]:
        """Serialise with a ``models`` writer (one format, one writer) and store the bytes:
        (artifact id, size in bytes)."""
        with tempfile.TemporaryDirectory(dir=self.store.root) as tmp:
            path = Path(tmp) / "artifact.safetensors"
            write(path)
            data = path.read_bytes()
        return self.store.put_bytes(data), len(data)
