"""The two reference problems of the benchmarks (docs/benchmarks.md), built with the
project's own code.

Digits (pixel / 16, stratified 80/20, ``random_state=0`` -> 1,437 train / 360 test),
queries = the first 10 test points, cross-entropy, damped GNH with λ = 1e-3.

- A: the built-in demo (``models.DEMO_CONFIG`` / ``models.DEMO_RECIPE``): MLP 64-32-32-10,
  tanh (3,466 parameters), full-batch Adam, lr 1e-2, 200 steps, seed 0.
- B: MLP 64-512-512-10, ReLU (301,066 parameters), full-batch Adam, lr 1e-3, 100 steps, seed 0.

Training is deterministic at a fixed torch thread count only, so a benchmark's helper
processes get the trained weights (:func:`save`, then ``load(name, weights=path)``)
instead of retraining.

Run ``python -m bench.reference`` to print both problems' sizes and accuracies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import models

DAMPING = 1e-3
NUM_QUERIES = 10

CONFIGS: dict[str, dict[str, Any]] = {
    "A": dict(models.DEMO_CONFIG),
    "B": {
        "architecture": "mlp",
        "in_features": 64,
        "hidden": [512, 512],
        "out_features": 10,
        "activation": "relu",
    },
}
RECIPES = {
    "A": models.DEMO_RECIPE,
    "B": models.Recipe(optimizer="adam", lr=1e-3, epochs=100, batch_size=None, seed=0),
}


@dataclass(frozen=True)
class ReferenceProblem:
    """A trained reference model with its training set and queries."""

    name: str
    model: nn.Module
    train: tuple[Tensor, Tensor]
    queries: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def config(self) -> dict[str, Any]:
        return CONFIGS[self.name]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        """E.g. ``"model B: MLP 64-512-512-10 ReLU, 301,066 parameters"``."""
        c = self.config
        sizes = "-".join(str(s) for s in [c["in_features"], *c["hidden"], c["out_features"]])
        activation = {"relu": "ReLU"}.get(c["activation"], c["activation"])
        return f"model {self.name}: MLP {sizes} {activation}, {self.num_parameters:,} parameters"

    def accuracy(self, split: str) -> float:
        x, y = self.train if split == "train" else self.test
        with torch.no_grad():
            return float((self.model(x).argmax(dim=1) == y).float().mean())

    def save(self, path: str | os.PathLike) -> None:
        """The trained weights as a checkpoint, for ``load(name, weights=path)``."""
        models.save_checkpoint(path, self.model, self.config)


def load(name: str, weights: str | os.PathLike | None = None) -> ReferenceProblem:
    """Reference problem ``"A"`` or ``"B"`` in float32: trained here (seconds on CPU), or
    with the weights of a checkpoint written by :meth:`ReferenceProblem.save`."""
    if name not in CONFIGS:
        raise ValueError(f"reference problem must be 'A' or 'B', got {name!r}")
    train_set = models.builtin_dataset("digits", "train")
    test_set = models.builtin_dataset("digits", "test")
    if weights is None:
        model = models.train(CONFIGS[name], train_set, RECIPES[name]).model()
    else:
        model, config = models.load_checkpoint(weights)
        if config != CONFIGS[name]:
            raise ValueError(f"{weights}: config {config} is not reference problem {name}'s")
    model = model.to(torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    test = (test_set.inputs, test_set.targets)
    queries = (test[0][:NUM_QUERIES], test[1][:NUM_QUERIES])
    return ReferenceProblem(name, model, (train_set.inputs, train_set.targets), queries, test)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for key in CONFIGS:
        problem = load(key)
        print(
            f"{problem.describe()}, "
            f"{len(problem.train[0])} train / {len(problem.test[0])} test, "
            f"train acc {problem.accuracy('train'):.3f}, test acc {problem.accuracy('test'):.3f}"
        )
