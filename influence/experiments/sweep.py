"""Factors in influence misalignment (appendix C.4, Figure 5): the decomposition rerun
with one factor (width, depth, epochs, weight decay, damping, removed fraction) swept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from influence.decomposition import DecompositionResult, decompose
from influence.experiments.config import ExperimentConfig
from influence.response import Responder
from influence.solvers import phase_progress
from models import Progress

__all__ = ["BASE_SHARE", "SweepResult", "run_decomposition", "sweep"]

BASE_SHARE = 0.2
"""Share of an experiment's progress bar given to the base training."""


def run_decomposition(
    config: ExperimentConfig, progress: Progress | None = None
) -> DecompositionResult:
    """Train the config's base run (the first ``BASE_SHARE`` of the progress, phase
    "train"), then decompose (config.decomposition)."""
    train_set, _ = config.datasets()
    run = config.train_base(train_set, phase_progress(progress, 0.0, BASE_SHARE, "train"))
    responder = Responder.from_run(run, train_set, config.response)
    return decompose(responder, config.decomposition, phase_progress(progress, BASE_SHARE, 1.0))


@dataclass
class SweepResult:
    """One decomposition per value of the swept factor."""

    parameter: str
    values: list[float]
    results: list[DecompositionResult]

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """``{gap: {"mean": [...], "std": [...]}}`` along ``values``."""
        names = list(self.results[0].gaps)
        return {
            g: {k: [r.summary()[g][k] for r in self.results] for k in ("mean", "std")}
            for g in names
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "parameter": self.parameter,
            "values": self.values,
            "curves": self.curves(),
            "results": [r.to_dict() for r in self.results],
        }

    def markdown(self, title: str = "Sweep") -> str:
        """Mean gap (L2 over training outputs) per value."""
        curves = self.curves()
        lines = [
            f"**{title}: {self.parameter}**",
            "",
            f"| {self.parameter} | " + " | ".join(curves) + " |",
            "|---:|" + "---:|" * len(curves),
        ]
        for i, value in enumerate(self.values):
            row = " | ".join(f"{curves[g]['mean'][i]:.3g}" for g in curves)
            lines.append(f"| {value:g} | {row} |")
        return "\n".join(lines) + "\n"


def sweep(config: ExperimentConfig, progress: Progress | None = None) -> SweepResult:
    """Run the decomposition at each value of ``config.sweep``."""
    if config.sweep is None:
        raise ValueError("config has no 'sweep' section ({'parameter': ..., 'values': [...]})")
    values = list(config.sweep.values)
    results = []
    for k, value in enumerate(values):
        step = config.with_value(config.sweep.parameter, value)

        def scaled(fraction: float, phase: str, k: int = k) -> None:
            if progress is not None:
                progress((k + fraction) / len(values), phase)

        results.append(run_decomposition(step, scaled))
    return SweepResult(config.sweep.parameter, values, results)
