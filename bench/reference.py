"""The two reference problems of ``shared/BENCHMARKS.md``, built with the project's own code.

Digits (pixel / 16, stratified 80/20, ``random_state=0`` -> 1,437 train / 360 test),
queries = the first 10 test points, cross-entropy, damped GNH with λ = 1e-3.

- A: MLP 64-32-32-10, tanh (3,466 parameters), full-batch Adam, lr 1e-2, 200 steps, seed 0.
- B: MLP 64-512-512-10, ReLU (301,066 parameters), full-batch Adam, lr 1e-3, 100 steps, seed 0.

Run ``python -m bench.reference`` to print both problems' sizes and accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import models

DAMPING = 1e-3
NUM_QUERIES = 10

CONFIGS = {
    "A": {"hidden": [32, 32], "activation": "tanh"},
    "B": {"hidden": [512, 512], "activation": "relu"},
}
RECIPES = {
    "A": models.Recipe(optimizer="adam", lr=1e-2, epochs=200, batch_size=None, seed=0),
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
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def accuracy(self, split: str) -> float:
        x, y = self.train if split == "train" else self.test
        with torch.no_grad():
            return float((self.model(x).argmax(dim=1) == y).float().mean())


def load(name: str) -> ReferenceProblem:
    """Train reference problem ``"A"`` or ``"B"`` (seconds on CPU) and return it in float32."""
    if name not in CONFIGS:
        raise ValueError(f"reference problem must be 'A' or 'B', got {name!r}")
    train_set = models.builtin_dataset("digits", "train")
    test_set = models.builtin_dataset("digits", "test")
    config = {"architecture": "mlp", "in_features": 64, "out_features": 10, **CONFIGS[name]}
    model = models.train(config, train_set, RECIPES[name]).model().eval()
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
            f"model {key}: {problem.num_parameters:,} parameters, "
            f"{len(problem.train[0])} train / {len(problem.test[0])} test, "
            f"train acc {problem.accuracy('train'):.3f}, test acc {problem.accuracy('test'):.3f}"
        )
