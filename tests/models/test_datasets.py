"""Dataset round trips, the bad-dataset corpus, and the built-in splits."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import models
from models import Dataset, DatasetError

META = {"name": "toy", "task": "classification", "num_classes": 3, "class_names": ["a", "b", "c"]}


def _toy() -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]), dict(META))


def _file(tensors: dict[str, torch.Tensor], metadata: dict | None = META) -> bytes:
    meta = {} if metadata is None else {"metadata": json.dumps(metadata)}
    return safetensors.torch.save(tensors, metadata=meta)


def test_round_trip_is_bit_exact_and_keeps_id(tmp_path: Path) -> None:
    ds = _toy()
    path = tmp_path / "toy.safetensors"
    models.save_dataset(path, ds)
    loaded = models.load_dataset(path)
    assert torch.equal(loaded.inputs, ds.inputs) and torch.equal(loaded.targets, ds.targets)
    assert loaded.metadata == ds.metadata
    assert loaded.id == ds.id and len(loaded) == 6
    assert models.load_dataset_bytes(path.read_bytes()).id == ds.id


def test_id_depends_on_content() -> None:
    ds = _toy()
    changed = Dataset(ds.inputs.clone(), ds.targets.clone(), dict(META))
    assert changed.id == ds.id
    changed.inputs[0, 0] += 1
    assert Dataset(changed.inputs, changed.targets, dict(META)).id != ds.id
    assert Dataset(ds.inputs, ds.targets, {**META, "name": "other"}).id != ds.id


def test_subset_keeps_metadata() -> None:
    ds = _toy()
    sub = ds.subset([4, 1])
    assert torch.equal(sub.inputs, ds.inputs[[4, 1]]) and sub.targets.tolist() == [1, 1]
    assert sub.metadata == ds.metadata and sub.num_classes == 3 and sub.task == "classification"


def test_token_datasets_are_allowed(tmp_path: Path) -> None:
    tokens = torch.randint(0, 5, (3, 5))
    ds = Dataset(tokens[:, :-1], tokens[:, 1:], {"task": "language_modeling"})
    assert models.validate_dataset(ds) is ds
    path = tmp_path / "tokens.safetensors"
    models.save_dataset(path, ds)  # views of one tensor are saved as separate tensors
    assert torch.equal(models.load_dataset(path).targets, tokens[:, 1:])


X, Y = torch.zeros(6, 4), torch.zeros(6, dtype=torch.long)

CORPUS = {
    "mismatched_lengths": (
        lambda: _file({"inputs": X, "targets": Y[:5]}),
        ["inputs has 6 examples but targets has 5"],
    ),
    "inputs_wrong_dtype": (
        lambda: _file({"inputs": X.to(torch.int32), "targets": Y}),
        ["inputs has dtype int32", "allowed: float16, bfloat16, float32, float64, int64"],
    ),
    "inputs_bool": (
        lambda: _file({"inputs": X.bool(), "targets": Y}),
        ["inputs has dtype bool"],
    ),
    "targets_wrong_dtype": (
        lambda: _file({"inputs": X, "targets": Y.to(torch.uint8)}),
        ["targets has dtype uint8"],
    ),
    "nan_input": (
        lambda: _file({"inputs": X.index_fill(0, torch.tensor([3]), float("nan")), "targets": Y}),
        ["inputs contains NaN values (first at example 3)"],
    ),
    "inf_target": (
        lambda: _file(
            {"inputs": X, "targets": torch.tensor([0.0, 1, float("-inf"), 0, 0, 0])},
            {"task": "regression"},
        ),
        ["targets contains Inf values (first at example 2)"],
    ),
    "missing_targets": (lambda: _file({"inputs": X}), ["missing tensor 'targets'"]),
    "extra_tensor": (
        lambda: _file({"inputs": X, "targets": Y, "weights": X.clone()}),
        ["unexpected tensor(s) ['weights']"],
    ),
    "no_examples": (
        lambda: _file({"inputs": X[:0], "targets": Y[:0]}),
        ["no examples"],
    ),
    "scalar_inputs": (
        lambda: _file({"inputs": torch.tensor(1.0), "targets": Y}),
        ["inputs must have a first (example) dimension"],
    ),
    "label_out_of_range": (
        lambda: _file({"inputs": X, "targets": Y.index_fill(0, torch.tensor([1]), 3)}),
        ["targets range [0, 3] outside [0, num_classes=3)"],
    ),
    "float_class_labels": (
        lambda: _file({"inputs": X, "targets": Y.float()}),
        ["classification targets must be int64"],
    ),
    "class_names_length": (
        lambda: _file({"inputs": X, "targets": Y}, {**META, "class_names": ["a"]}),
        ["1 class_names for num_classes=3"],
    ),
    "unknown_task": (
        lambda: _file({"inputs": X, "targets": Y}, {"task": "ranking"}),
        ["task 'ranking' is not one of"],
    ),
    "input_shape_mismatch": (
        lambda: _file({"inputs": X, "targets": Y}, {"input_shape": [3, 3]}),
        ["input_shape [3, 3] does not hold the 4 values"],
    ),
    # metadata keys the service reads, with the wrong JSON type (were TypeErrors or accepted)
    **{
        f"{key}_{label}": (
            lambda key=key, value=value: _file({"inputs": X, "targets": Y}, {**META, key: value}),
            [f"metadata {key!r} must be {kind}"],
        )
        for key, kind, cases in [
            (
                "num_classes",
                "a positive integer",
                {"string": "2", "float": 2.5, "bool": True, "zero": 0, "list": [3]},
            ),
            ("class_names", "a list of strings", {"number": 5, "ints": [1, 2, 3], "str": "abc"}),
            (
                "input_shape",
                "a list of positive integers",
                {"string": "ab", "nested": [[2]], "zero": [0, 4], "float": [2.0, 2.0]},
            ),
            ("name", "a string", {"number": 5, "list": ["toy"]}),
        ]
        for label, value in cases.items()
    },
    "metadata_not_json": (
        lambda: safetensors.torch.save({"inputs": X, "targets": Y}, metadata={"metadata": "{"}),
        ["metadata is not valid JSON"],
    ),
    "metadata_nested_too_deeply": (
        lambda: safetensors.torch.save(
            {"inputs": X, "targets": Y}, metadata={"metadata": "[" * 20_000}
        ),
        ["metadata is not valid JSON (nested too deeply)"],
    ),
    "empty_targets": (
        lambda: _file({"inputs": X, "targets": torch.zeros(len(X), 0, dtype=torch.int64)}),
        ["targets of shape [6, 0] hold no values per example"],
    ),
    "empty_inputs": (
        lambda: _file({"inputs": torch.zeros(len(X), 0), "targets": Y}),
        ["inputs of shape [6, 0] hold no values per example"],
    ),
    "not_safetensors": (lambda: b"inputs,targets\n1,2\n", ["header length"]),
    "truncated": (lambda: _file({"inputs": X, "targets": Y})[:-1], ["truncated data"]),
    "pickle": (
        lambda: b"\x80\x04\x95" + b"\x00" * 20,
        ["is a Python pickle", "without unpickling"],
    ),
    "huge_header": (lambda: struct.pack("<Q", 2**64 - 1), ["exceeds the cap"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_dataset(case: str, tmp_path: Path) -> None:
    make, fragments = CORPUS[case]
    path = tmp_path / "data.safetensors"
    path.write_bytes(make())
    for load in (lambda: models.load_dataset(path), lambda: models.load_dataset_bytes(make())):
        with pytest.raises(DatasetError) as info:
            load()
        for fragment in fragments:
            assert fragment in str(info.value)


def test_oversize_is_refused(tmp_path: Path) -> None:
    ds = _toy()  # 6×4 float32 + 6 int64 = 144 bytes of tensor data
    with pytest.raises(DatasetError, match="144 bytes of tensor data, over the cap of 100"):
        models.validate_dataset(ds, max_bytes=100)
    path = tmp_path / "toy.safetensors"
    models.save_dataset(path, ds)
    with pytest.raises(DatasetError, match="over the cap of 100 bytes"):
        models.load_dataset(path, max_bytes=100)
    with pytest.raises(DatasetError, match="over the cap of 100"):
        models.load_dataset_bytes(path.read_bytes(), max_bytes=100)


def test_save_validates(tmp_path: Path) -> None:
    bad = Dataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), {})
    with pytest.raises(DatasetError, match="inputs has 3 examples but targets has 4"):
        models.save_dataset(tmp_path / "bad.safetensors", bad)
    with pytest.raises(DatasetError, match="metadata is not JSON-serialisable"):
        models.validate_dataset(Dataset(X, Y, {"when": object()}))
    with pytest.raises(DatasetError, match=r"inputs must be a torch\.Tensor, got ndarray"):
        models.validate_dataset(Dataset(np.zeros((6, 4)), Y, {}))


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "features", "num_classes"),
    [
        ("digits", 1437, 360, 64, 10),
        ("breast_cancer", 455, 114, 30, 2),
        ("diabetes", 353, 89, 10, None),
    ],
)
def test_builtin_splits(name, n_train, n_test, features, num_classes) -> None:
    train, test = models.builtin_dataset(name), models.builtin_dataset(name, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.inputs.shape == (n_train, features) and train.inputs.dtype == torch.float32
    assert train.metadata["name"] == name and train.metadata["split"] == "train"
    assert train.num_classes == num_classes
    assert models.builtin_dataset(name).id == train.id != test.id
    if num_classes is not None:
        assert train.targets.dtype == torch.int64
        assert len(train.metadata["class_names"]) == num_classes
        # stratified: class proportions agree between the splits to within one example
        for c in range(num_classes):
            share = (train.targets == c).float().mean() - (test.targets == c).float().mean()
            assert abs(float(share)) <= 1 / len(test)
    else:
        assert train.targets.shape == (n_train, 1) and train.targets.dtype == torch.float32


def test_digits_matches_the_benchmark_definition() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x_tr, _, _, y_te = train_test_split(
        raw.data / 16, raw.target, test_size=0.2, stratify=raw.target, random_state=0
    )
    train, test = models.builtin_dataset("digits"), models.builtin_dataset("digits", "test")
    assert torch.equal(train.inputs, torch.tensor(x_tr, dtype=torch.float32))
    assert torch.equal(test.targets, torch.tensor(y_te))
    assert train.metadata["input_shape"] == [8, 8]
    assert float(train.inputs.min()) == 0.0 and float(train.inputs.max()) == 1.0


def _raw_split(name: str) -> tuple[np.ndarray, ...]:
    """scikit-learn's raw rows of ``name``, split as documented on ``builtin_dataset``
    (80/20, random_state=0, stratified for classification): x_tr, x_te, y_tr, y_te."""
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from sklearn.model_selection import train_test_split

    if name == "breast_cancer":
        raw = load_breast_cancer()
        return train_test_split(
            raw.data, raw.target, test_size=0.2, stratify=raw.target, random_state=0
        )
    raw = load_diabetes(scaled=False)
    return train_test_split(raw.data, raw.target.reshape(-1, 1), test_size=0.2, random_state=0)


def _assert_rebuilds(
    standardised: torch.Tensor, stats: dict, raw: np.ndarray, raw_train: np.ndarray
) -> None:
    """``stats`` are the raw train split's mean/std, and ``mean + x * std`` gives back the raw
    rows (compared in train standard deviations: the stored values are float32)."""
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    std = torch.tensor(stats["std"], dtype=torch.float64)
    torch.testing.assert_close(mean, torch.from_numpy(raw_train.mean(0)), rtol=1e-12, atol=0)
    torch.testing.assert_close(std, torch.from_numpy(raw_train.std(0)), rtol=1e-12, atol=0)
    rebuilt = mean + standardised.double() * std
    unit = torch.from_numpy(raw_train.std(0))
    torch.testing.assert_close(rebuilt / unit, torch.from_numpy(raw) / unit, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes"])
def test_standardised_with_train_statistics(name: str) -> None:
    train, test = models.builtin_dataset(name), models.builtin_dataset(name, "test")
    x = train.inputs.double()
    torch.testing.assert_close(
        x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        x.std(0, unbiased=False), torch.ones(x.shape[1], dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert test.inputs.double().mean(0).abs().max() > 1e-3  # test split is not re-standardised
    x_tr, x_te, y_tr, y_te = _raw_split(name)
    assert test.metadata == {**train.metadata, "split": "test"}
    stats = train.metadata["input_standardisation"]
    _assert_rebuilds(train.inputs, stats, x_tr, x_tr)
    _assert_rebuilds(test.inputs, stats, x_te, x_tr)  # the test split uses train statistics
    if name == "breast_cancer":
        assert "target_standardisation" not in train.metadata
        assert torch.equal(train.targets, torch.from_numpy(y_tr))
        assert torch.equal(test.targets, torch.from_numpy(y_te))
    else:
        y = train.targets.double()
        assert abs(float(y.mean())) < 1e-6 and abs(float(y.std(unbiased=False)) - 1) < 1e-5
        stats = train.metadata["target_standardisation"]
        _assert_rebuilds(train.targets, stats, y_tr, y_tr)
        _assert_rebuilds(test.targets, stats, y_te, y_tr)


def test_unknown_builtin_and_split() -> None:
    with pytest.raises(DatasetError, match=r"unknown built-in dataset 'mnist'.*digits"):
        models.builtin_dataset("mnist")
    with pytest.raises(DatasetError, match="split must be 'train' or 'test', got 'val'"):
        models.builtin_dataset("digits", "val")
