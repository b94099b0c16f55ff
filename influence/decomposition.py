"""The misalignment decomposition of influence vs leave-one-out retraining (Table 5).

For M sampled removed sets z, the response functions of ``influence.response`` give
parameters θ_method(z); each gap is ``d(a, b) = ‖f(θ_a, X) − f(θ_b, X)‖₂`` over the raw
outputs on the whole training set (appendix C.2):

- warm-start = d(cold, warm); proximity = d(warm, proximal);
- non-convergence = d(proximal, PBRF); linearization = d(PBRF, linearized PBRF);
- solver = d(linearized PBRF, influence).

Each gap is reported as mean ± std over the removed sets, both as ``d`` and as the
per-example RMS ``d/√N`` (comparable across dataset sizes), with each set's removal
leverage ``ρ_z`` (``Responder.removal_leverage``): the linearization gap grows with it.
Without a recorded θ⁰ (a plain checkpoint) the warm-start gap is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp

from influence.operators import DampedCurvature
from influence.response import Responder, output_distance
from influence.solvers import phase_progress
from models import Progress
from models.datasets import is_int
from models.precision import ieee_float32

__all__ = [
    "GAPS",
    "DecompositionArguments",
    "DecompositionResult",
    "compute_responses",
    "decompose",
    "first_order_proximity",
    "sample_removed",
]

GAPS: tuple[tuple[str, str, str], ...] = (
    ("warm_start", "cold", "warm"),
    ("proximity", "warm", "proximal"),
    ("non_convergence", "proximal", "pbrf"),
    ("linearization", "pbrf", "linearized"),
    ("solver", "linearized", "influence"),
)


@dataclass(frozen=True)
class DecompositionArguments:
    """Which removed sets to sample and whether to run the cold start."""

    num_points: int = field(default=20, metadata={"help": "M, removed sets sampled."})
    seed: int = field(default=0, metadata={"help": "Seed of the removed-set sampler."})
    group_fraction: float | None = field(
        default=None,
        metadata={"help": "Remove a random group of this fraction of N per set (None: 1 point)."},
    )
    cold_start: bool = field(
        default=True, metadata={"help": "Retrain from θ⁰ (needs the recorded run's history)."}
    )
    proximity_first_order: bool = field(
        default=False,
        metadata={
            "help": "Also report the proximity gap's first-order closed form "
            "‖J[H_Q⁻¹ − (H_Q+λI)⁻¹] ε∇L_z‖ with H_Q the true Hessian of the down-weighted "
            "cost (meaningful at a converged θˢ; needs H_Q positive definite)."
        },
    )

    def __post_init__(self) -> None:
        points, seed = self.num_points, self.seed
        if not (is_int(points) and points >= 1):
            raise ValueError(f"num_points must be an integer >= 1, got {points!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        for name in ("cold_start", "proximity_first_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        fraction = self.group_fraction
        if fraction is not None and not (isinstance(fraction, float) and 0 < fraction < 1):
            raise ValueError(f"group_fraction must be in (0, 1) or None, got {fraction!r}")


def sample_removed(n: int, arguments: DecompositionArguments) -> list[list[int]]:
    """M seeded removed sets: distinct single points, or random groups of ``fraction·N``."""
    gen = torch.Generator().manual_seed(arguments.seed)
    if arguments.group_fraction is None:
        if arguments.num_points > n:
            raise ValueError(f"num_points = {arguments.num_points} exceeds the {n} examples")
        return [[i] for i in torch.randperm(n, generator=gen)[: arguments.num_points].tolist()]
    size = max(1, round(arguments.group_fraction * n))
    return [
        sorted(torch.randperm(n, generator=gen)[:size].tolist())
        for _ in range(arguments.num_points)
    ]


@ieee_float32()
def first_order_proximity(
    responder: Responder, removed_sets: Sequence[Sequence[int]]
) -> list[float]:
    """``‖J [H_Q⁻¹ − (H_Q+λI)⁻¹] ε Σ_z ∇L_z‖`` per removed set: warm − proximal, each the
    Newton step from a converged θˢ on its own objective (Eqns 5 and 7; ``J`` is the
    output Jacobian on the training set). ``H_Q = H − ε ∇²Σ_z L_z`` is the true Hessian of
    the down-weighted cost Q that both minimise (``wd·I`` included), whatever
    ``arguments.hessian`` says; it must be positive definite (θˢ a strict minimum). The
    full-data H instead would miss z's own curvature, a first-order fraction ρ_z of
    the step (``Responder.removal_leverage``). Solved by the responder's solver."""

    def hessian(damping: float) -> DampedCurvature:
        return DampedCurvature(
            responder.fmodel, responder.theta_s, responder.loss, responder.inputs,
            responder.targets, kind="full", weight_decay=responder.recipe.weight_decay,
            damping=damping,
        )  # fmt: skip

    plain, damped = hessian(0.0), hessian(responder.arguments.damping)

    def outputs(theta: Tensor) -> Tensor:
        return responder.fmodel(theta, responder.inputs)

    gaps = []
    for z in removed_sets:
        problem = responder.problem(z)
        rhs = problem.epsilon * problem.removed_gradient
        steps = [
            responder.solver.solve(op.downweighted(problem.removed, problem.epsilon), rhs)[0]
            for op in (plain, damped)
        ]
        gaps.append(float(jvp(outputs, (responder.theta_s,), (steps[0] - steps[1],))[1].norm()))
    return gaps


@ieee_float32()
def compute_responses(
    responder: Responder,
    removed_sets: Sequence[Sequence[int]],
    methods: Sequence[str],
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Parameters ``[M, d]`` of each method for each removed set, and the solver report."""
    retrain = [m for m in methods if m != "influence"]
    thetas: dict[str, Tensor] = {}
    report: dict[str, Any] = {}
    if "influence" in methods:
        thetas["influence"], solve = responder.influence(removed_sets)
        report = solve.to_dict()
    found: dict[str, list[Tensor]] = {m: [] for m in retrain}
    total = max(1, len(removed_sets) * len(retrain))
    for j, removed in enumerate(removed_sets):
        for k, method in enumerate(retrain):
            done = j * len(retrain) + k
            step = phase_progress(progress, done / total, (done + 1) / total, f"retrain:{method}")
            found[method].append(responder.retrain(method, removed, step))
            if progress is not None:
                progress((j * len(retrain) + k + 1) / total, f"retrain:{method}")
    thetas.update({m: torch.stack(v) for m, v in found.items()})
    return thetas, report


@dataclass
class DecompositionResult:
    """Per-set gaps (``d``, L2 over the N training outputs) and their summary."""

    removed: list[list[int]]
    gaps: dict[str, list[float]]
    num_train: int
    solver_report: dict[str, Any]
    leverage: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{gap: {mean, std, rms_mean, rms_std}}`` (std over sets; RMS = d/√N)."""
        out = {}
        root = math.sqrt(self.num_train)
        for name, values in self.gaps.items():
            v = torch.tensor(values, dtype=torch.float64)
            std = float(v.std()) if len(v) > 1 else 0.0
            out[name] = {
                "mean": float(v.mean()),
                "std": std,
                "rms_mean": float(v.mean()) / root,
                "rms_std": std / root,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "num_train": self.num_train,
            "removed": self.removed,
            "gaps": self.gaps,
            "summary": self.summary(),
            "leverage": self.leverage,
            "solver_report": self.solver_report,
        }

    def markdown(self, title: str = "Misalignment decomposition") -> str:
        """A Table 5-style Markdown table: d (L2 over training outputs) and RMS per example."""
        lines = [
            f"**{title}** (M = {len(self.removed)} removed sets, N = {self.num_train})",
            "",
            "| gap | d = L2 over training outputs | RMS per example (d/√N) |",
            "|---|---:|---:|",
        ]
        for name, s in self.summary().items():
            lines.append(
                f"| {name} | {s['mean']:.3g} ± {s['std']:.2g} | "
                f"{s['rms_mean']:.3g} ± {s['rms_std']:.2g} |"
            )
        return "\n".join(lines) + "\n"


@ieee_float32()
def decompose(
    responder: Responder,
    arguments: DecompositionArguments | None = None,
    progress: Progress | None = None,
) -> DecompositionResult:
    """The five gaps of Table 5 for ``arguments.num_points`` seeded removed sets.

    ``responder`` carries the base model, data, recipe and response settings; build it
    with ``Responder.from_run`` (recorded run: all gaps) or ``Responder(config, state,
    recipe, dataset)`` (checkpoint: no warm-start gap). ``progress(fraction, phase)``.
    """
    arguments = arguments or DecompositionArguments()
    cold = arguments.cold_start and responder.has_history
    gaps = [g for g in GAPS if cold or g[0] != "warm_start"]
    methods = list(dict.fromkeys(m for _, a, b in gaps for m in (a, b)))
    removed = sample_removed(responder.n, arguments)
    thetas, report = compute_responses(responder, removed, methods, progress)
    outputs = {m: [responder.outputs(t) for t in thetas[m]] for m in methods}
    values = {
        name: [output_distance(x, y) for x, y in zip(outputs[a], outputs[b], strict=True)]
        for name, a, b in gaps
    }
    if arguments.proximity_first_order:
        values["proximity_first_order"] = first_order_proximity(responder, removed)
    leverage = responder.removal_leverage(removed, thetas["influence"]).tolist()
    return DecompositionResult(removed, values, responder.n, report, leverage)
