"""Test-loss correlations (Tables 6-8): does influence predict retraining?

For M removed training points and T random test points, the influence-predicted change
of each test loss, ``∇L_qᵀ ε (G+λI)⁻¹ ∇L_z`` (Eqn 20), is compared with the actual change
``L_q(θ_method) − L_q(θˢ)`` under each retraining response (cold, warm, PBRF, two-stage),
pooled over the M·T pairs, by Pearson and Spearman correlation. Per removed point it also
reports the least-squares slope of actual on predicted changes and the removal leverage
``ρ_z`` (``Responder.removal_leverage``): the PBRF slope is about ``1/(1 − ρ_z)``, so a point
with large ``ρ_z`` has a PBRF effect several times its influence prediction and dominates
the pooled Pearson.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from influence.decomposition import compute_responses
from influence.experiments.config import CorrelationArguments
from influence.response import Responder, pearson_spearman
from models import Dataset, Progress

__all__ = ["CorrelationResult", "correlate"]


@dataclass
class CorrelationResult:
    """Predicted ``[M, T]`` and actual ``{method: [M, T]}`` test-loss changes."""

    removed: list[int]
    test_indices: list[int]
    predicted: Tensor
    actual: dict[str, Tensor]
    solver_report: dict[str, Any]
    leverage: list[float] = field(default_factory=list)

    def row_slopes(self, method: str) -> list[float]:
        """Per removed point, the least-squares slope of actual on predicted changes
        (``pᵀa / pᵀp``; 1 = influence predicts the size of the effect)."""
        actual, predicted = self.actual[method], self.predicted
        return ((predicted * actual).sum(1) / predicted.pow(2).sum(1)).tolist()

    def statistics(self) -> dict[str, dict[str, float | None]]:
        """``{method: {pearson, spearman}}`` against the influence prediction."""
        return {m: pearson_spearman(self.predicted, a) for m, a in self.actual.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "removed": self.removed,
            "test_indices": self.test_indices,
            "statistics": self.statistics(),
            "predicted": self.predicted.tolist(),
            "actual": {m: a.tolist() for m, a in self.actual.items()},
            "leverage": self.leverage,
            "row_slopes": {m: self.row_slopes(m) for m in self.actual},
            "solver_report": self.solver_report,
        }

    def markdown(self, title: str = "Test-loss correlations with influence") -> str:
        """Table 6/8-style Markdown: Pearson (P) and Spearman (S) per method."""
        m, t = self.predicted.shape
        lines = [
            f"**{title}** (M = {m} removed points × T = {t} test points)",
            "",
            "| method | Pearson | Spearman |",
            "|---|---:|---:|",
        ]
        for method, s in self.statistics().items():
            p, r = (f"{v:.3f}" if v is not None else "n/a" for v in (s["pearson"], s["spearman"]))
            lines.append(f"| {method} | {p} | {r} |")
        if self.leverage and "pbrf" in self.actual:
            k = max(range(m), key=lambda i: self.leverage[i])
            rho, slope = self.leverage[k], self.row_slopes("pbrf")[k]
            lines += [
                "",
                f"Largest removal leverage: train index {self.removed[k]}, ρ = {rho:.3f}, "
                f"1/(1−ρ) = {1 / (1 - rho):.2f}; its PBRF/influence slope is {slope:.2f}.",
            ]
        return "\n".join(lines) + "\n"


def correlate(
    responder: Responder,
    test_set: Dataset,
    arguments: CorrelationArguments | None = None,
    progress: Progress | None = None,
) -> CorrelationResult:
    """Influence-predicted vs actual test-loss changes for seeded removed/test points."""
    arguments = arguments or CorrelationArguments()
    if "cold" in arguments.methods and not responder.has_history:
        raise ValueError("correlation method 'cold' needs a recorded run (theta0, batch order)")
    if arguments.num_points > responder.n or arguments.num_test > len(test_set):
        raise ValueError(
            f"num_points/num_test ({arguments.num_points}/{arguments.num_test}) exceed the "
            f"{responder.n} training / {len(test_set)} test examples"
        )
    gen = torch.Generator().manual_seed(arguments.seed)
    removed = torch.randperm(responder.n, generator=gen)[: arguments.num_points].tolist()
    tests = torch.randperm(len(test_set), generator=gen)[: arguments.num_test].tolist()
    x, t = test_set.inputs[tests], test_set.targets[tests]
    thetas, report = compute_responses(
        responder, [[i] for i in removed], ["influence", *arguments.methods], progress
    )
    # The result is kept on the CPU (plots and JSON) whatever the responder's device.
    predicted = responder.predicted_changes(thetas["influence"], x, t).cpu()
    actual = {m: responder.actual_changes(thetas[m], x, t).cpu() for m in arguments.methods}
    leverage = responder.removal_leverage([[i] for i in removed], thetas["influence"])
    return CorrelationResult(removed, tests, predicted, actual, report, leverage.tolist())
