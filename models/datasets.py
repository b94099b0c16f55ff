"""Datasets: an ``inputs``/``targets`` tensor pair with JSON metadata, stored as safetensors.

File format: tensors ``"inputs"`` and ``"targets"`` (first dimension = examples) and
safetensors metadata ``{"format": "influence-service/dataset", "version": "1",
"metadata": <JSON object>}``. Built-in datasets come from scikit-learn's bundled copies
(no download), with fixed splits documented on :func:`builtin_dataset`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.checkpoints import canonical_json, nonfinite, tensor_digest
from models.errors import DatasetError
from models.safetensors_io import parse_json, read_bytes, read_file, write_file

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_MAX_DATASET_BYTES",
    "Dataset",
    "builtin_dataset",
    "load_dataset",
    "load_dataset_bytes",
    "save_dataset",
    "validate_dataset",
]

FORMAT = "influence-service/dataset"
VERSION = "1"
DEFAULT_MAX_DATASET_BYTES = 1 * 2**30
TASKS = ("classification", "regression", "language_modeling")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64)
_TARGET_DTYPES = (torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_Split = tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples ``inputs[i]`` with ``targets[i]``.

    ``metadata``: ``name``; ``task`` ("classification" | "regression" |
    "language_modeling"); for classification ``num_classes`` and ``class_names``;
    ``input_shape`` (per-example shape to draw inputs as images, e.g. ``[8, 8]``); any
    other JSON-able entries (e.g. standardisation statistics).
    """

    inputs: Tensor
    targets: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @cached_property
    def id(self) -> str:
        """sha256 hex of the canonical metadata JSON followed by both tensors."""
        hasher = hashlib.sha256(canonical_json(self.metadata).encode())
        tensor_digest(hasher, {"inputs": self.inputs, "targets": self.targets})
        return hasher.hexdigest()

    @property
    def task(self) -> str | None:
        """``metadata["task"]`` (e.g. ``"classification"``), if recorded."""
        return self.metadata.get("task")

    @property
    def num_classes(self) -> int | None:
        """``metadata["num_classes"]``, if recorded."""
        return self.metadata.get("num_classes")

    def subset(self, indices: Tensor | list[int]) -> Dataset:
        """The examples at ``indices`` (same metadata)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.inputs[idx], self.targets[idx], dict(self.metadata))


def validate_dataset(
    ds: Dataset, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES, what: str = "dataset"
) -> Dataset:
    """Check a dataset; return it unchanged or raise :class:`DatasetError` naming the problem.

    Rules: inputs floating (or int64 tokens), targets int64 or floating, equal and
    non-zero first dimensions, all values finite, at most ``max_bytes`` of tensor data,
    metadata a JSON object with a known task; classification targets in
    ``[0, num_classes)``.
    """
    for name, tensor, dtypes in (
        ("inputs", ds.inputs, _INPUT_DTYPES),
        ("targets", ds.targets, _TARGET_DTYPES),
    ):
        if not isinstance(tensor, Tensor):
            raise DatasetError(
                f"{what}: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dim() == 0:
            raise DatasetError(f"{what}: {name} must have a first (example) dimension")
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise DatasetError(
                f"{what}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                f"allowed: {allowed}"
            )
    if ds.inputs.shape[0] != ds.targets.shape[0]:
        raise DatasetError(
            f"{what}: inputs has {ds.inputs.shape[0]} examples but targets has "
            f"{ds.targets.shape[0]}"
        )
    if ds.inputs.shape[0] == 0:
        raise DatasetError(f"{what}: no examples")
    for name, tensor in (("inputs", ds.inputs), ("targets", ds.targets)):
        if tensor[0].numel() == 0:
            raise DatasetError(
                f"{what}: {name} of shape {list(tensor.shape)} hold no values per example"
            )
    size = sum(t.numel() * t.element_size() for t in (ds.inputs, ds.targets))
    if size > max_bytes:
        raise DatasetError(f"{what}: {size} bytes of tensor data, over the cap of {max_bytes}")
    for name, tensor in (("inputs", ds.inputs), ("targets", ds.targets)):
        bad = nonfinite(tensor)
        if bad:
            raise DatasetError(f"{what}: {name} contains {bad.replace('index', 'example')}")
    _validate_metadata(ds, what)
    return ds


def first_outside(
    values: Tensor, low: float, high: float, *, closed: bool = False
) -> tuple[int, float] | None:
    """``(example, value)`` of the first value outside ``[low, high)`` (``[low, high]``
    when ``closed``), examples along the first dimension in order; None if all lie inside."""
    bad = (values < low) | ((values > high) if closed else (values >= high))
    if not bool(bad.any()):
        return None
    row = int(bad.reshape(len(bad), -1).any(dim=1).nonzero()[0, 0])
    return row, values[row][bad[row]].reshape(-1)[0].item()


def _validate_metadata(ds: Dataset, what: str) -> None:
    meta = ds.metadata
    if not isinstance(meta, dict):
        raise DatasetError(f"{what}: metadata must be a dict, got {type(meta).__name__}")
    try:
        canonical_json(meta)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what}: metadata is not JSON-serialisable ({exc})") from None
    task = meta.get("task")
    if task is not None and task not in TASKS:
        raise DatasetError(f"{what}: metadata task {task!r} is not one of {list(TASKS)}")
    _check_metadata_types(meta, what)
    num_classes = meta.get("num_classes")
    if task == "classification" and num_classes is not None:
        if ds.targets.dtype != torch.int64:
            raise DatasetError(f"{what}: classification targets must be int64 class indices")
        low, high = int(ds.targets.min()), int(ds.targets.max())
        if low < 0 or high >= num_classes:
            raise DatasetError(
                f"{what}: targets range [{low}, {high}] outside [0, num_classes={num_classes})"
            )
        names = meta.get("class_names")
        if names is not None and len(names) != num_classes:
            raise DatasetError(f"{what}: {len(names)} class_names for num_classes={num_classes}")
    shape = meta.get("input_shape")
    if shape is not None and math.prod(shape) != ds.inputs[0].numel():
        raise DatasetError(
            f"{what}: input_shape {shape} does not hold the {ds.inputs[0].numel()} values "
            "of one example"
        )


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (JSON ``true`` would otherwise count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata_types(meta: dict[str, Any], what: str) -> None:
    """The keys the service reads must have their documented JSON types when present."""
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise DatasetError(f"{what}: metadata 'name' must be a string, got {name!r:.60}")
    num_classes = meta.get("num_classes")
    if num_classes is not None and not (is_int(num_classes) and num_classes >= 1):
        raise DatasetError(
            f"{what}: metadata 'num_classes' must be a positive integer, got {num_classes!r:.60}"
        )
    names = meta.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        raise DatasetError(
            f"{what}: metadata 'class_names' must be a list of strings, got {names!r:.60}"
        )
    shape = meta.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and all(is_int(d) and d >= 1 for d in shape)
    ):
        raise DatasetError(
            f"{what}: metadata 'input_shape' must be a list of positive integers, got {shape!r:.60}"
        )


def save_dataset(path: str | os.PathLike, ds: Dataset) -> None:
    """Validate ``ds`` and write it as a safetensors dataset file."""
    validate_dataset(ds)
    metadata = {"format": FORMAT, "version": VERSION, "metadata": canonical_json(ds.metadata)}
    write_file(path, {"inputs": ds.inputs, "targets": ds.targets}, metadata)


def _from_tensors(
    tensors: dict[str, Tensor], meta: dict[str, str], what: str, max_bytes: int
) -> Dataset:
    for name in ("inputs", "targets"):
        if name not in tensors:
            raise DatasetError(f"{what}: missing tensor {name!r}")
    extra = sorted(set(tensors) - {"inputs", "targets"})
    if extra:
        raise DatasetError(f"{what}: unexpected tensor(s) {extra}; only 'inputs' and 'targets'")
    try:
        metadata = parse_json(meta.get("metadata", "{}"))
    except ValueError as exc:
        raise DatasetError(f"{what}: metadata is not valid JSON ({exc})") from None
    ds = Dataset(tensors["inputs"], tensors["targets"], metadata)
    return validate_dataset(ds, max_bytes=max_bytes, what=what)


def load_dataset_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> Dataset:
    """Validate and load a dataset from memory; problems raise :class:`DatasetError`."""
    if len(data) > max_bytes:
        raise DatasetError(f"dataset: {len(data)} bytes, over the cap of {max_bytes}")
    return _from_tensors(*read_bytes(data, "dataset", DatasetError), "dataset", max_bytes)


def load_dataset(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> Dataset:
    """Validate and load a dataset file no larger than ``max_bytes``."""
    what = f"dataset {os.fspath(path)!r}"
    return _from_tensors(*read_file(path, what, DatasetError, max_bytes), what, max_bytes)


def _split(x: np.ndarray, y: np.ndarray, stratify: bool) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y if stratify else None)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    return (train - mean) / std, (test - mean) / std, stats


def _digits() -> _Split:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x_tr, x_te, y_tr, y_te = _split(raw.data / 16.0, raw.target, stratify=True)
    meta = {
        "task": "classification",
        "num_classes": 10,
        "class_names": [str(c) for c in raw.target_names],
        "input_shape": [8, 8],
        "preprocessing": "pixel / 16; stratified 80/20 split, random_state=0",
    }
    return meta, x_tr, x_te, y_tr, y_te


def _breast_cancer() -> _Split:
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = _split(raw.data, raw.target, stratify=True)
    x_tr, x_te, stats = _standardise(x_tr, x_te)
    meta = {
        "task": "classification",
        "num_classes": 2,
        "class_names": [str(c) for c in raw.target_names],
        "input_shape": [int(raw.data.shape[1])],
        "feature_names": [str(f) for f in raw.feature_names],
        "input_standardisation": stats,
        "preprocessing": "stratified 80/20 split, random_state=0; inputs standardised "
        "with train mean/std",
    }
    return meta, x_tr, x_te, y_tr, y_te


def _diabetes() -> _Split:
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False)
    x_tr, x_te, y_tr, y_te = _split(raw.data, raw.target.reshape(-1, 1), stratify=False)
    x_tr, x_te, x_stats = _standardise(x_tr, x_te)
    y_tr, y_te, y_stats = _standardise(y_tr, y_te)
    meta = {
        "task": "regression",
        "input_shape": [int(raw.data.shape[1])],
        "feature_names": [str(f) for f in raw.feature_names],
        "input_standardisation": x_stats,
        "target_standardisation": y_stats,
        "preprocessing": "80/20 split, random_state=0; inputs and targets standardised "
        "with train mean/std",
    }
    return meta, x_tr, x_te, y_tr, y_te


BUILTIN_DATASETS: dict[str, Callable[[], _Split]] = {
    "breast_cancer": _breast_cancer,
    "diabetes": _diabetes,
    "digits": _digits,
}


def builtin_dataset(name: str, split: str = "train") -> Dataset:
    """A built-in dataset from scikit-learn's bundled data (works offline).

    - ``digits``: 8×8 images flattened to 64 float32 values in [0, 1] (pixel / 16), int64
      labels 0–9; stratified 80/20 split with ``random_state=0`` -> 1437 train / 360 test.
    - ``breast_cancer`` (UCI Wisconsin): 30 features standardised with the train split's
      mean/std, int64 labels (0 malignant, 1 benign); stratified 80/20, ``random_state=0``
      -> 455 / 114.
    - ``diabetes``: 10 raw features and the target, both standardised with train
      statistics (stored in metadata); float32 targets ``[N, 1]``; 80/20,
      ``random_state=0`` -> 353 / 89.
    """
    if name not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown built-in dataset {name!r}; valid: {sorted(BUILTIN_DATASETS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    meta, x_tr, x_te, y_tr, y_te = BUILTIN_DATASETS[name]()
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    targets = (
        torch.from_numpy(np.asarray(y, dtype=np.int64))
        if meta["task"] == "classification"
        else torch.from_numpy(np.asarray(y, dtype=np.float32))
    )
    inputs = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return validate_dataset(Dataset(inputs, targets, {"name": name, "split": split, **meta}))
