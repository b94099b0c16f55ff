"""``models.train(device=...)`` on the CPU: bit-identical to no device, runs recorded on
the CPU, and clear errors for devices that cannot be used (tests/gpu/ runs it on CUDA)."""

from __future__ import annotations

import pytest
import torch

import models
from models import Dataset, Recipe, TrainingError, TrainRun
from models.training import resolve_device

CONFIG = {"architecture": "mlp", "in_features": 3, "hidden": [5], "out_features": 3,
          "activation": "tanh"}  # fmt: skip
MINIBATCH = Recipe(
    optimizer="sgdm", lr=0.1, momentum=0.9, epochs=3, batch_size=5, weight_decay=1e-2,
    schedule="step", milestones=(2,), gamma=0.5, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Dataset(x, y, {"task": "classification", "num_classes": 3})


def _assert_identical(a: TrainRun, b: TrainRun) -> None:
    for mine, theirs in ((a.theta0, b.theta0), (a.thetas, b.thetas)):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert len(a.batch_order) == len(b.batch_order)
    assert all(torch.equal(p, q) for p, q in zip(a.batch_order, b.batch_order, strict=True))
    assert a.losses == b.losses


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_cpu_device_is_bit_identical_to_no_device(data: Dataset, device) -> None:
    weights = torch.linspace(0.5, 1.5, len(data))
    for kwargs in ({}, {"dtype": torch.float64, "example_weights": weights}):
        plain = models.train(CONFIG, data, MINIBATCH, **kwargs)
        placed = models.train(CONFIG, data, MINIBATCH, device=device, **kwargs)
        _assert_identical(placed, plain)


def test_objective_replay_and_init_on_a_device_match(data: Dataset) -> None:
    base = models.train(CONFIG, data, MINIBATCH)
    seen: list[torch.device] = []

    def objective(model, x, t, idx):
        seen.append(idx.device)
        return torch.nn.functional.cross_entropy(model(x), t)

    kwargs = {"init": base.thetas, "batch_order": base.batch_order, "objective": objective}
    plain = models.train(CONFIG, data, MINIBATCH, **kwargs)
    placed = models.train(CONFIG, data, MINIBATCH, device="cpu", **kwargs)
    _assert_identical(placed, plain)
    assert set(seen) == {torch.device("cpu")}


def test_run_is_recorded_on_the_cpu(data: Dataset) -> None:
    run = models.train(CONFIG, data, MINIBATCH, device="cpu")
    tensors = [*run.theta0.values(), *run.thetas.values(), *run.batch_order]
    assert all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("gpu", "'gpu' is not a torch device name"),
        ("", "'' is not a torch device name"),
        ("cuda:x", "'cuda:x' is not a torch device name"),
        ("meta", "only 'cpu', 'cuda' and 'mps' devices are supported"),
        (3, "device must be a device name such as 'cpu'"),
    ],
)
def test_bad_device_is_a_clear_training_error(data: Dataset, device, fragment: str) -> None:
    with pytest.raises(TrainingError, match=fragment):
        models.train(CONFIG, data, MINIBATCH, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_says_so_and_where_to_get_it(data: Dataset, device) -> None:
    with pytest.raises(TrainingError, match="CUDA is not available") as info:
        models.train(CONFIG, data, MINIBATCH, device=device)
    assert "README.md" in str(info.value) and "CUDA build" in str(info.value)


def test_resolve_device_names_the_caller_and_its_error_type() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device 'tpu' is not") as info:
        resolve_device("tpu", "--device", ValueError)
    assert type(info.value) is ValueError
