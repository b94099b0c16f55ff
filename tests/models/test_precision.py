"""``models.precision.ieee_float32``: TF32 off for its duration, the caller's settings
restored after it (also after an error), and ``models.train`` running under it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import models
from models.precision import ieee_float32


def current() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_allowed() -> Iterator[None]:
    """The caller's settings: TF32 allowed for matmuls and cuDNN convolutions."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=True):
        yield
    torch.set_float32_matmul_precision(before)


class Recording(nn.Module):
    """A linear model that records the precision settings its forward pass runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: list[tuple[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(current())
        return self.linear(x)


def test_tf32_is_off_inside_and_restored_after(tf32_allowed) -> None:
    with ieee_float32():
        assert current() == ("highest", False)
    assert current() == ("high", True)
    with pytest.raises(RuntimeError, match="boom"), ieee_float32():
        raise RuntimeError("boom")
    assert current() == ("high", True)


def test_training_runs_in_full_float32(tf32_allowed, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Recording()
    monkeypatch.setattr("models.training.build", lambda config: model)
    data = models.Dataset(
        torch.randn(8, 3), torch.randint(2, (8,)), {"task": "classification", "num_classes": 2}
    )
    models.train({"architecture": "mlp"}, data, models.Recipe(epochs=2, batch_size=4))
    assert model.seen and set(model.seen) == {("highest", False)}
    assert current() == ("high", True)
