"""The engine computes in full float32: TF32 (cuDNN convolutions by default on CUDA,
matmuls under ``torch.set_float32_matmul_precision("high")``) is off in every forward
pass of its construction, solves and scoring, and the caller's settings come back."""

from __future__ import annotations

import torch
from torch import nn

from influence import CG, Exact, InfluenceEngine
from tests.models.test_precision import current, tf32_allowed  # noqa: F401  (fixture)

SEEN: list[tuple[str, bool]] = []


class Recording(nn.Module):
    """A linear classifier recording the precision settings of its forward passes (in a
    module-level list: the engine works on a copy of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(current())
        return self.linear(x)


def test_every_engine_computation_runs_without_tf32(tf32_allowed) -> None:  # noqa: F811
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(10, 3, generator=g), torch.randint(2, (10,), generator=g)
    SEEN.clear()
    engine = InfluenceEngine(Recording(), train=(x, t), damping=0.1)
    engine.scores((x[:2], t[:2]), CG(tol=1e-6))
    engine.self_influence(Exact())
    engine.group_influence([[0, 1]], (x[:2], t[:2]), Exact())
    engine.gradients(x[:2], t[:2])
    assert len(SEEN) >= 5 and set(SEEN) == {("highest", False)}
    assert current() == ("high", True)
