"""Mislabelled-example detection (appendix D.3, Figure 6).

A seeded fraction of training labels is replaced by a different random class; the model
is trained on the corrupted data; training examples are then inspected in the order of a
ranking and the fraction of corrupted labels found is recorded against the fraction of
data inspected. Rankings: self-influence ``(1/N) ∇L_iᵀ (G+λI)⁻¹ ∇L_i`` (highest first),
the training loss alone (a strong baseline on small data) and a seeded random order;
optionally PBRF self-influence (the increase of ``L_i`` when i is removed by PBRF) on the
top of the training-loss list, as one PBRF solve per point is costly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from influence.experiments.config import ExperimentConfig, MislabelArguments, train_base
from influence.response import Responder, ResponseArguments, pearson_spearman
from influence.solvers import Exact, Lanczos, phase_progress
from models import Dataset, Progress, Recipe

__all__ = [
    "MislabelResult",
    "corrupt_labels",
    "detect_mislabels",
    "detect_mislabels_on",
    "detection_curve",
    "pbrf_self_influence",
]


def corrupt_labels(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Tensor]:
    """A copy of ``dataset`` with ``round(fraction·N)`` labels changed to a different class
    drawn uniformly; returns it and the sorted corrupted indices."""
    classes = dataset.metadata.get("num_classes")
    if dataset.metadata.get("task") != "classification" or not classes:
        raise ValueError("mislabel detection needs a classification dataset with num_classes")
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset)
    chosen = torch.randperm(n, generator=gen)[: round(fraction * n)].sort().values
    shift = torch.randint(1, classes, (len(chosen),), generator=gen)
    targets = dataset.targets.clone()
    targets[chosen] = (targets[chosen] + shift) % classes
    meta = {**dataset.metadata, "name": f"{dataset.metadata.get('name', 'data')}-corrupted"}
    return Dataset(dataset.inputs, targets, meta), chosen


def detection_curve(order: Tensor, corrupted: Tensor, n: int) -> Tensor:
    """Fraction of corrupted examples found after inspecting the first k of ``order``,
    for k = 0…N (``[N+1]``)."""
    flags = torch.zeros(n, dtype=torch.float64)
    flags[corrupted] = 1.0
    found = torch.cat([torch.zeros(1, dtype=torch.float64), flags[order].cumsum(0)])
    return found / max(1, len(corrupted))


@dataclass
class MislabelResult:
    """Detection curves ``{ranking: [N+1]}`` on the corrupted training set."""

    corrupted: list[int]
    curves: dict[str, Tensor]
    details: dict[str, Any]

    def found_at(self, inspected: float) -> dict[str, float]:
        """Fraction of corrupted labels found after inspecting ``inspected`` of the data."""
        n = len(next(iter(self.curves.values()))) - 1
        k = round(inspected * n)
        return {name: float(curve[k]) for name, curve in self.curves.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (curves at 1% steps)."""
        n = len(next(iter(self.curves.values()))) - 1
        grid = [round(p * n / 100) for p in range(101)]
        return {
            "num_train": n,
            "corrupted": self.corrupted,
            "found_at": {f"{p:.2f}": self.found_at(p) for p in (0.05, 0.1, 0.2, 0.3, 0.5)},
            "curves": {
                "inspected": [k / n for k in grid],
                **{name: [float(c[k]) for k in grid] for name, c in self.curves.items()},
            },
            **self.details,
        }

    def markdown(self, title: str = "Mislabelled-example detection") -> str:
        """Fraction of corrupted labels found vs fraction inspected, per ranking."""
        points = (0.05, 0.1, 0.2, 0.3, 0.5)
        found = {p: self.found_at(p) for p in points}
        lines = [
            f"**{title}** ({len(self.corrupted)} corrupted labels)",
            "",
            "| ranking | " + " | ".join(f"{p:.0%} inspected" for p in points) + " |",
            "|---|" + "---:|" * len(points),
        ]
        for name in self.curves:
            row = " | ".join(f"{found[p][name]:.1%}" for p in points)
            lines.append(f"| {name} | {row} |")
        pbrf = self.details.get("pbrf_self_influence")
        if pbrf is not None and pbrf["spearman"] is not None:
            lines += [
                "",
                f"PBRF vs influence self-influence on the {len(pbrf['indices'])} highest-loss "
                f"points: Pearson {pbrf['pearson']:.3f}, Spearman {pbrf['spearman']:.3f}.",
            ]
        return "\n".join(lines) + "\n"


def detect_mislabels(config: ExperimentConfig, progress: Progress | None = None) -> MislabelResult:
    """Corrupt, train the base recipe, rank and score every ranking (config.mislabel)."""
    clean, _ = config.datasets()
    return detect_mislabels_on(
        config.model, config.recipe, clean, config.response, config.mislabel, progress
    )


def detect_mislabels_on(
    model_config: dict[str, Any],
    recipe: Recipe,
    train_set: Dataset,
    response: ResponseArguments,
    arguments: MislabelArguments,
    progress: Progress | None = None,
) -> MislabelResult:
    """Corrupt a seeded fraction of ``train_set``'s labels, train ``model_config`` from
    scratch with ``recipe`` (its seed) on the corrupted set, and score every ranking
    (self-influence, training loss, random; optionally PBRF). Classification data only."""
    corrupted_set, corrupted = corrupt_labels(train_set, arguments.fraction, arguments.seed)
    training = phase_progress(progress, 0.0, 0.3, "train")
    run = train_base(model_config, corrupted_set, recipe, response, training)
    responder = Responder.from_run(run, corrupted_set, response)
    solver = Exact() if arguments.solver == "exact" else Lanczos()
    scoring = phase_progress(progress, 0.3, 0.8, "self_influence")
    self_influence = responder.engine.self_influence(solver, scoring)
    if progress is not None:
        progress(0.8, "self_influence")
    losses = responder.losses(responder.theta_s, responder.inputs, responder.targets)
    # A generator of its own: the corruption's generator would replay the corrupted indices.
    gen = torch.Generator().manual_seed(arguments.seed + 1)
    n = len(corrupted_set)
    orders = {
        "self-influence": self_influence.argsort(descending=True, stable=True).cpu(),
        "training loss": losses.argsort(descending=True, stable=True).cpu(),
        "random": torch.randperm(n, generator=gen),
    }
    details: dict[str, Any] = {"train_loss": run.losses[-1]}
    if arguments.pbrf_points:
        count = min(arguments.pbrf_points, n)
        head = orders["training loss"][:count]
        gains = pbrf_self_influence(responder, head, phase_progress(progress, 0.8, 1.0))
        ranked = head[gains.argsort(descending=True, stable=True)]
        orders["PBRF self-influence (top of loss list)"] = torch.cat(
            [ranked, orders["training loss"][count:]]
        )
        details["pbrf_points"] = count
        details["pbrf_self_influence"] = {
            "indices": head.tolist(),
            "pbrf": gains.tolist(),
            "influence": self_influence[head].tolist(),
            **pearson_spearman(self_influence[head], gains),
        }
    curves = {name: detection_curve(order, corrupted, n) for name, order in orders.items()}
    return MislabelResult(corrupted.tolist(), curves, details)


def pbrf_self_influence(
    responder: Responder, indices: Tensor, progress: Progress | None = None
) -> Tensor:
    """PBRF self-influence ``L_i(θ_PBRF(i)) − L_i(θˢ)`` of each training point i in
    ``indices``: the increase of its own loss when the PBRF (Eqn 8) removes it, one PBRF
    solve per point. To first order in ε it is the self-influence
    ``ε ∇L_iᵀ(G+λI)⁻¹∇L_i``; returns ``[len(indices)]``."""
    x, t = responder.inputs, responder.targets
    gains = []
    for k, i in enumerate(indices.tolist()):
        step = phase_progress(
            progress, k / len(indices), (k + 1) / len(indices), "pbrf_self_influence"
        )
        theta = responder.retrain("pbrf", [i], step)
        gains.append(float(responder.actual_changes(theta[None], x[[i]], t[[i]])[0, 0]))
        if progress is not None:
            progress((k + 1) / len(indices), "pbrf_self_influence")
    return torch.tensor(gains, dtype=torch.float64)
