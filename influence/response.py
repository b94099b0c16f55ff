"""Response functions: what influence functions approximate, computed by optimisation.

Removing a set z of training points from the cost ``J(θ) = (1/N) Σ_i L_i(θ) + (wd/2)‖θ‖²``
is downweighting each of its losses by ``ε`` (``ε = 1/N`` removes it exactly), giving
``Q(θ) = J(θ) − ε Σ_{z∈z} L_z(θ)`` (docs/engine.md, Conventions; appendix Eqn 5).
Starting from the recorded run (θ⁰, θˢ, recipe, batch order) the response functions are
(the response table of docs/experiments/README.md, appendix C.2):

- ``cold``: minimise ``Q`` from θ⁰ for K + K/2 epochs, the first K with the base batch
  order and learning rates (the schedule spans K epochs, then its last rate is held);
- ``warm``: minimise ``Q`` from θˢ for K/2 epochs;
- ``proximal``: ``Q + (λ/2)‖θ−θˢ‖²`` from θˢ (Eqn 7);
- ``pbrf``: ``(1/N) Σ_i D_{L_i}(f(θ,x_i), f(θˢ,x_i)) − ε Σ_z L_z + ((wd+λ)/2)‖θ−θˢ‖²``
  from θˢ with the learning rate ÷ 10 (Eqn 8);
- ``linearized``: ``(1/N) Σ_i ½ (J_iΔ)ᵀ H_i (J_iΔ) − ε Σ_z ∇L_zᵀΔ + ((wd+λ)/2)‖Δ‖²``,
  ``Δ = θ − θˢ`` (Eqn 10), minimised like ``pbrf``; its minimiser is
  ``Δ = ε (G+λI)⁻¹ Σ_z ∇L_z`` (Eqn 46), which is what ``influence`` computes with a solver;
- ``two_stage``: ``θˢ + (warm(D − z) − warm(D))`` with one batch order (appendix D.2).

Minibatch recipes optimise each objective's minibatch estimate: the data term (losses,
Bregman divergences, Gauss-Newton quadratic) is averaged over the batch, while the removed
points' term ``ε Σ_z L_z`` and the proximity terms are evaluated exactly at every step.
Full-batch recipes (L-BFGS) therefore optimise the objectives exactly, as does
``ResponseArguments(optimizer="lbfgs")`` for every response started from θˢ.

PBRF can be unbounded below: with cross-entropy, z's own loss cancels inside it and leaves
a term linear in z's logits, which a ReLU network can grow quadratically in θ faster than
``(λ/2)‖θ−θˢ‖²`` grows; such runs stop with a ``models.TrainingError`` saying so.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor, nn
from torch.func import grad, jvp

from influence.engine import InfluenceEngine
from influence.functional import FlatModel
from influence.solvers import CG, Exact, LiSSA, Solver, SolverReport, phase_progress
from models import (
    ARCHITECTURES,
    ConfigError,
    Dataset,
    Progress,
    Recipe,
    TrainingError,
    TrainRun,
    build,
    load_checkpoint,
    train,
    validate_dataset,
)
from models.checkpoints import check_state_dict
from models.datasets import is_int
from models.losses import Loss, get_loss
from models.precision import ieee_float32
from models.training import resolve_device

__all__ = [
    "RETRAIN_METHODS",
    "VERIFY_METHODS",
    "Responder",
    "ResponseArguments",
    "ResponseProblem",
    "TrainingData",
    "VerifyArguments",
    "VerifyResult",
    "bregman_divergence",
    "live_parameters",
    "output_distance",
    "pearson_spearman",
    "verify",
]

RETRAIN_METHODS = ("cold", "warm", "proximal", "pbrf", "linearized", "two_stage")
VERIFY_METHODS = ("pbrf", "warm", "linearized")

TrainingData = Dataset | tuple[Tensor, Tensor]
"""A ``models.Dataset`` or an ``(inputs, targets)`` pair of tensors (as ``InfluenceEngine``
takes); a pair becomes ``Dataset(inputs, targets)`` with no metadata."""


def _as_dataset(data: Any, name: str) -> Dataset:
    """``data`` (a :data:`TrainingData`) as a validated ``models.Dataset``.

    Raises ``TypeError`` for anything else and ``models.DatasetError`` (a ``ValueError``)
    naming ``name`` for a malformed one (unequal lengths, non-finite values, bad dtypes).
    """
    if isinstance(data, Dataset):
        dataset = data
    elif isinstance(data, tuple | list):
        if len(data) != 2:
            raise TypeError(
                f"{name} must be a models.Dataset or an (inputs, targets) pair of tensors, "
                f"got a {type(data).__name__} of {len(data)} items"
            )
        for part, value in zip(("inputs", "targets"), data, strict=True):
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{name}: {part} must be a torch.Tensor, got {type(value).__name__}"
                )
        dataset = Dataset(data[0], data[1])
    else:
        raise TypeError(
            f"{name} must be a models.Dataset or an (inputs, targets) pair of tensors, "
            f"got {type(data).__name__}"
        )
    return validate_dataset(dataset, max_bytes=sys.maxsize, what=name)


def _registered_config(config: Any, who: str) -> dict[str, Any]:
    """``config`` as a dict if it names a registered architecture (``models.ARCHITECTURES``);
    retraining rebuilds the network from it with ``models.build`` (via ``models.train``),
    so an arbitrary ``nn.Module`` with no such config cannot be retrained."""
    valid = ", ".join(sorted(ARCHITECTURES))
    need = (
        f"{who} retrains the model, so it needs a registered architecture config "
        f"(models.ARCHITECTURES: {valid})"
    )
    if not isinstance(config, Mapping):
        raise ConfigError(f"{need}; got {type(config).__name__}, not a dict")
    if "architecture" not in config:
        raise ConfigError(f"{need}; got a config without 'architecture'")
    name = config["architecture"]
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ConfigError(f"{need}; got architecture {name!r}")
    return dict(config)


def live_parameters(model: nn.Module) -> Tensor:
    """θ of ``model`` as one flat vector that stays attached to its parameters' autograd
    (``FlatModel`` order), so an objective of θ can drive ``model``'s optimiser."""
    return torch.cat([p.reshape(-1) for p in model.parameters() if p.requires_grad])


def bregman_divergence(loss: Loss, outputs: Tensor, reference: Tensor, targets: Tensor) -> Tensor:
    """Per-example ``D_L(y, yˢ) = L(y,t) − L(yˢ,t) − ∇_y L(yˢ,t)ᵀ(y − yˢ)`` (Eqn 8).

    ``outputs`` = y, ``reference`` = yˢ (both ``[B, ...]``); non-negative for losses convex
    in the outputs, and zero at ``y = yˢ``.
    """
    ref = reference.detach()
    ref_grad = grad(lambda y: loss.per_example(y, targets).sum())(ref)
    linear = (ref_grad * (outputs - ref)).reshape(outputs.shape[0], -1).sum(dim=1)
    return loss.per_example(outputs, targets) - loss.per_example(ref, targets) - linear


def output_distance(first: Tensor, second: Tensor) -> float:
    """``d(a, b)``: L2 norm of the difference of two networks' raw outputs (Table 5)."""
    return float(torch.linalg.vector_norm(first - second))


@dataclass
class ResponseProblem:
    """The data every response objective needs, all objectives as functions of flat θ.

    ``model`` fixes the architecture; ``theta_s`` (default: its current parameters) is θˢ.
    ``removed`` indexes the removed set z into ``inputs``/``targets``; ``epsilon`` is the
    downweighting per removed point (default ``1/N``). Everything is computed on the device
    of ``inputs``, which should be that of ``model`` (and ``theta_s``).
    """

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss: Loss | str
    removed: Sequence[int] | Tensor
    epsilon: float | None = None
    weight_decay: float = 0.0
    damping: float = 1e-3
    theta_s: Tensor | None = None
    fmodel: FlatModel = field(init=False)
    outputs_s: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.loss = get_loss(self.loss)
        n = len(self.inputs)
        if len(self.targets) != n:
            raise ValueError(f"inputs have {n} examples but targets have {len(self.targets)}")
        self.removed = torch.as_tensor(self.removed, dtype=torch.long).reshape(-1)
        if self.removed.numel() == 0:
            raise ValueError("removed: at least one training index is needed")
        if int(self.removed.min()) < 0 or int(self.removed.max()) >= n:
            raise ValueError(f"removed: indices must lie in [0, {n}), got {self.removed.tolist()}")
        self.removed = self.removed.to(self.inputs.device)
        if self.epsilon is None:
            self.epsilon = 1.0 / n
        for name in ("weight_decay", "damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.fmodel, theta = FlatModel.of(self.model)
        self.theta_s = (theta if self.theta_s is None else self.theta_s).detach().clone()
        with torch.no_grad():
            self.outputs_s = self.outputs(self.theta_s)

    @property
    def n(self) -> int:
        """N, the number of training examples."""
        return len(self.inputs)

    def outputs(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``f(θ, x_i)`` for the examples ``idx`` (all when None)."""
        x = self.inputs if idx is None else self.inputs[idx]
        return self.fmodel(theta, x)

    def _targets(self, idx: Tensor | None) -> Tensor:
        return self.targets if idx is None else self.targets[idx]

    def removed_loss(self, theta: Tensor) -> Tensor:
        """``Σ_{z∈z} L(f(θ, x_z), t_z)``."""
        out = self.outputs(theta, self.removed)
        return self.loss.per_example(out, self.targets[self.removed]).sum()

    def cost(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``J(θ) = (1/N) Σ_i L_i + (wd/2)‖θ‖²`` (data term averaged over ``idx`` if given)."""
        per = self.loss.per_example(self.outputs(theta, idx), self._targets(idx))
        return per.mean() + 0.5 * self.weight_decay * theta.pow(2).sum()

    def downweighted(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``Q(θ) = J(θ) − ε Σ_z L_z(θ)`` (Eqn 5)."""
        return self.cost(theta, idx) - self.epsilon * self.removed_loss(theta)

    def proximal(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``Q(θ) + (λ/2)‖θ − θˢ‖²`` (Eqn 7)."""
        return self.downweighted(theta, idx) + self._proximity(theta, self.damping)

    def pbrf(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``(1/N) Σ_i D_{L_i}(f(θ,x_i), f(θˢ,x_i)) − ε Σ_z L_z + ((wd+λ)/2)‖θ−θˢ‖²`` (Eqn 8)."""
        ref = self.outputs_s if idx is None else self.outputs_s[idx]
        div = bregman_divergence(self.loss, self.outputs(theta, idx), ref, self._targets(idx))
        return (
            div.mean()
            - self.epsilon * self.removed_loss(theta)
            + self._proximity(theta, self.weight_decay + self.damping)
        )

    def linearized_pbrf(self, theta: Tensor, idx: Tensor | None = None) -> Tensor:
        """``(1/N) Σ_i ½(J_iΔ)ᵀH_i(J_iΔ) − ε Σ_z ∇L_zᵀΔ + ((wd+λ)/2)‖Δ‖²``, Δ = θ−θˢ (Eqn 10).

        ``J_i`` (output Jacobian) and ``H_i`` (output Hessian of the loss) are taken at θˢ.
        """
        delta = theta - self.theta_s
        ref = self.outputs_s if idx is None else self.outputs_s[idx]
        _, jd = jvp(lambda th: self.outputs(th, idx), (self.theta_s,), (delta,))
        hjd = self.loss.output_hvp(ref, self._targets(idx), jd)
        quad = 0.5 * (jd * hjd).reshape(jd.shape[0], -1).sum(dim=1).mean()
        return (
            quad
            - self.epsilon * (self.removed_gradient @ delta)
            + 0.5 * (self.weight_decay + self.damping) * delta.pow(2).sum()
        )

    @cached_property
    def removed_gradient(self) -> Tensor:
        """``Σ_{z∈z} ∇_θ L_z(θˢ)``, flat."""
        return grad(self.removed_loss)(self.theta_s).detach()

    def _proximity(self, theta: Tensor, strength: float) -> Tensor:
        return 0.5 * strength * (theta - self.theta_s).pow(2).sum()


def _positive(
    name: str, value: float | int | None, *, allow_none: bool = False, integer: bool = False
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number > 0 (an int if
    ``integer``; never a bool), or None with ``allow_none``."""
    if value is None and allow_none:
        return
    kinds = int if integer else int | float
    if not (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")


@dataclass(frozen=True)
class ResponseArguments:
    """How the response functions of a recorded run are computed (the response table of
    docs/experiments/README.md)."""

    epsilon: float | None = field(
        default=None,
        metadata={"help": "Downweighting ε per removed point; None = 1/N (exact removal)."},
    )
    damping: float = field(default=1e-3, metadata={"help": "λ of G + λI and of the proximity."})
    epochs: int | None = field(
        default=None,
        metadata={"help": "Epochs of every retraining from θˢ; None = K/2 (K = recipe epochs)."},
    )
    pbrf_lr_factor: float = field(
        default=0.1, metadata={"help": "PBRF / linearized PBRF learning rate = lr × this."}
    )
    optimizer: str | None = field(
        default=None,
        metadata={
            "help": "None: every response uses the base recipe's optimizer (the paper). "
            "'lbfgs': every response started from θˢ (warm, proximal, PBRF, linearized, "
            "two-stage) is solved by full-batch L-BFGS for lbfgs_steps outer steps, converging "
            "objectives that K/2 epochs of SGD at lr/10 cannot on a CPU budget; cold start "
            "always replays the base recipe."
        },
    )
    lbfgs_steps: int = field(
        default=50,
        metadata={"help": "Outer L-BFGS steps (≤ 20 iterations each) if optimizer='lbfgs'."},
    )
    hessian: str = field(default="gnh", metadata={"help": "Curvature: 'gnh' or 'full'."})
    solver: str = field(
        default="exact", metadata={"help": "Influence solver: 'exact', 'cg' or 'lissa'."}
    )
    cg_tol: float = field(default=1e-10, metadata={"help": "CG relative-residual tolerance."})
    cg_max_iter: int = field(default=2000, metadata={"help": "CG iteration limit."})
    lissa_depth: int = field(default=5000, metadata={"help": "LiSSA recursion depth."})
    lissa_repeats: int = field(default=1, metadata={"help": "LiSSA repeats averaged."})
    dtype: str = field(
        default="float64", metadata={"help": "'float64' (exact gaps) or 'float32' (faster)."}
    )
    device: str = field(
        default="cpu",
        metadata={
            "help": "Torch device of the responses, the influence solve and the base training "
            "of the experiments: 'cpu', 'cuda' or 'cuda:N'. θ⁰ and the batch orders are drawn "
            "on the CPU, so only rounding differs between devices."
        },
    )

    def __post_init__(self) -> None:
        for name in ("epsilon", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | None):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.epsilon is not None and not math.isfinite(self.epsilon):
            raise ValueError(f"epsilon must be finite or None, got {self.epsilon!r}")
        if not (self.damping is not None and math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        epochs = self.epochs
        if epochs is not None and not (is_int(epochs) and epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1 or None, got {epochs!r}")
        _positive("pbrf_lr_factor", self.pbrf_lr_factor)
        _positive("cg_tol", self.cg_tol)
        for name in ("cg_max_iter", "lissa_depth", "lissa_repeats", "lbfgs_steps"):
            _positive(name, getattr(self, name), integer=True)
        choices = {"hessian": ("gnh", "full"), "solver": ("exact", "cg", "lissa"),
                   "dtype": ("float64", "float32"), "optimizer": (None, "lbfgs")}  # fmt: skip
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}"
                )
        if not isinstance(self.device, str):
            raise ValueError(
                f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}"
            )
        resolve_device(self.device, "device", ValueError)

    def make_solver(self) -> Solver:
        """The engine's solver named by ``solver``."""
        if self.solver == "exact":
            return Exact()
        if self.solver == "cg":
            return CG(tol=self.cg_tol, max_iter=self.cg_max_iter)
        return LiSSA(depth=self.lissa_depth, repeats=self.lissa_repeats)


class Responder:
    """Computes every response function for removed sets z of one base run.

    ``config`` must be a registered architecture config (``models.build``; retraining
    rebuilds the network from it) that ``thetas`` fits, else :class:`models.ConfigError`;
    ``dataset`` is a ``models.Dataset`` or an ``(inputs, targets)`` tensor pair
    (:data:`TrainingData`), kept as a ``Dataset`` in ``self.dataset``.
    ``theta0``/``batch_order`` (the recorded start and epoch orders) are needed only by
    ``cold``; a plain checkpoint with its recipe supports every other method. Retraining
    goes through ``models.train`` with the recipe (``weight_decay`` moved into the
    objective), so the optimiser, schedule and batching are the base run's.
    ``solver``: the influence solver object (e.g. ``CG(tol=1e-8, max_iter=1000)``);
    None builds the one ``arguments`` names (``ResponseArguments.make_solver``).

    Everything is computed on ``arguments.device``: the model, θˢ, the training data and
    the engine live there, retraining runs there (``models.train(device=...)``), and the
    flat θ, outputs and losses returned are on it (``.cpu()`` them to serialise).
    ``dataset``, ``theta0`` and ``batch_order`` stay as given (normally CPU).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        thetas: Mapping[str, Tensor],
        recipe: Recipe,
        dataset: TrainingData,
        arguments: ResponseArguments | None = None,
        *,
        theta0: Mapping[str, Tensor] | None = None,
        batch_order: Sequence[Tensor] | None = None,
        solver: Solver | None = None,
    ) -> None:
        self.arguments = arguments or ResponseArguments()
        self.solver: Solver = solver if solver is not None else self.arguments.make_solver()
        self.dtype = getattr(torch, self.arguments.dtype)
        self.device = resolve_device(self.arguments.device, "device", ValueError)
        self.config, self.recipe = _registered_config(config, "Responder"), recipe
        self.dataset = _as_dataset(dataset, "dataset")
        self.theta0, self.batch_order = theta0, list(batch_order or [])
        self.model = build(self.config).to(self.dtype)
        check_state_dict(
            self.model.state_dict(),
            thetas,
            f"state dict does not fit build(config) for {self.config['architecture']!r}",
            ConfigError,
            dtypes=False,  # cast to the responder's dtype below
        )
        self.model.load_state_dict(dict(thetas), strict=True)
        self.model.to(self.device).eval()
        self.fmodel, self.theta_s = FlatModel.of(self.model)
        self.loss = get_loss(recipe.loss)
        self.inputs = self._cast(self.dataset.inputs)
        self.targets = self._cast(self.dataset.targets)
        self.n = len(self.dataset)
        self.retrain_epochs = self.arguments.epochs or max(1, recipe.epochs // 2)
        self.engine = InfluenceEngine(
            self.model, self.loss, train=(self.inputs, self.targets),
            hessian=self.arguments.hessian, damping=self.arguments.damping,
            weight_decay=recipe.weight_decay,
        )  # fmt: skip
        self._warm_full: Tensor | None = None

    @classmethod
    def from_run(
        cls, run: TrainRun, dataset: TrainingData, arguments: ResponseArguments | None = None
    ) -> Responder:
        """From a recorded ``models.TrainRun`` (all methods, ``cold`` included)."""
        return cls(
            run.config, run.thetas, run.recipe, dataset, arguments,
            theta0=run.theta0, batch_order=run.batch_order,
        )  # fmt: skip

    @property
    def has_history(self) -> bool:
        """Whether θ⁰ and the batch orders are known (``cold`` is possible)."""
        return self.theta0 is not None and len(self.batch_order) > 0

    def problem(
        self, removed: Sequence[int] | Tensor, epsilon: float | None = None
    ) -> ResponseProblem:
        """The objectives for removing ``removed`` (ε defaults to the arguments' ε)."""
        return ResponseProblem(
            self.model, self.inputs, self.targets, self.loss, removed,
            epsilon=self.arguments.epsilon if epsilon is None else epsilon,
            weight_decay=self.recipe.weight_decay, damping=self.arguments.damping,
            theta_s=self.theta_s,
        )  # fmt: skip

    def _train(
        self,
        objective: Callable[[Tensor, Tensor], Tensor],
        *,
        init: Mapping[str, Tensor],
        epochs: int,
        lr_factor: float = 1.0,
        batch_order: Sequence[Tensor] | None = None,
        schedule_epochs: int | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        recipe = replace(self.recipe, weight_decay=0.0, lr=self.recipe.lr * lr_factor)
        if self.arguments.optimizer == "lbfgs" and batch_order is None:  # not a cold replay
            recipe = replace(
                recipe, optimizer="lbfgs", lr=1.0, batch_size=None, schedule="none",
                lbfgs_tolerance_grad=1e-12, lbfgs_tolerance_change=1e-16,
            )  # fmt: skip
            epochs = self.arguments.lbfgs_steps
        try:
            run = train(
                self.config, self.dataset, recipe, init=init, batch_order=batch_order,
                epochs=epochs, schedule_epochs=schedule_epochs, dtype=self.dtype,
                device=self.device, progress=progress,
                objective=lambda m, _x, _t, idx: objective(live_parameters(m), idx),
            )  # fmt: skip
        except TrainingError as exc:
            raise TrainingError(
                f"{objective.__name__} response diverged ({exc}). Its objective can be unbounded "
                "below, e.g. PBRF for a ReLU network with cross-entropy when the damping is "
                "small: raise damping, lower the learning rate, or use the linearized response"
            ) from exc
        flat = torch.cat([run.thetas[name].reshape(-1) for name in self.fmodel.names])
        return flat.to(self.device)  # TrainRun keeps θ on the CPU

    def _cast(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the responder's device, floating ones in its dtype."""
        if tensor.is_floating_point():
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(self.device)

    def _state(self, theta: Tensor) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.fmodel.unflatten(theta).items()}

    @ieee_float32()
    def retrain(
        self, method: str, removed: Sequence[int] | Tensor, progress: Progress | None = None
    ) -> Tensor:
        """θ of one retraining response (``cold``, ``warm``, ``proximal``, ``pbrf``,
        ``linearized`` or ``two_stage``) for removing ``removed``; flat, at the end.
        ``progress(fraction, "train")`` follows the training (``models.train``); it may
        raise to abort it."""
        problem = self.problem(removed)
        k2, start = self.retrain_epochs, self._state(self.theta_s)
        if method == "cold":
            if not self.has_history:
                raise ValueError("cold start needs the recorded run's theta0 and batch_order")
            return self._train(
                problem.downweighted, init=self.theta0, epochs=self.recipe.epochs + k2,
                batch_order=self.batch_order, schedule_epochs=max(1, self.recipe.epochs),
                progress=progress,
            )  # fmt: skip
        if method == "warm":
            return self._train(problem.downweighted, init=start, epochs=k2, progress=progress)
        if method == "proximal":
            return self._train(problem.proximal, init=start, epochs=k2, progress=progress)
        if method == "pbrf":
            return self._train(
                problem.pbrf, init=start, epochs=k2, lr_factor=self.arguments.pbrf_lr_factor,
                progress=progress,
            )  # fmt: skip
        if method == "linearized":
            return self._train(
                problem.linearized_pbrf, init=start, epochs=k2,
                lr_factor=self.arguments.pbrf_lr_factor, progress=progress,
            )  # fmt: skip
        if method == "two_stage":
            if self._warm_full is None:
                full = self.problem(removed, epsilon=0.0)
                self._warm_full = self._train(
                    full.downweighted, init=start, epochs=k2,
                    progress=phase_progress(progress, 0.0, 0.5),
                )  # fmt: skip
            warm = self._train(
                problem.downweighted, init=start, epochs=k2,
                progress=phase_progress(progress, 0.5, 1.0),
            )  # fmt: skip
            return self.theta_s + (warm - self._warm_full)
        raise ValueError(f"unknown retraining method {method!r}; valid: {RETRAIN_METHODS}")

    @ieee_float32()
    def influence(
        self, removed_sets: Sequence[Sequence[int] | Tensor], progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``θˢ + ε (G+λI)⁻¹ Σ_z ∇L_z`` for each removed set (Eqn 6), one solve for all;
        returns ``[M, d]`` parameters and the solver's report."""
        problems = [self.problem(z) for z in removed_sets]
        rhs = torch.stack([p.removed_gradient for p in problems], dim=1)
        eps = [p.epsilon for p in problems]
        solution, report = self.solver.solve(self.engine.operator, rhs, progress)
        scale = torch.tensor(eps, dtype=solution.dtype, device=solution.device)
        deltas = solution.T * scale[:, None]
        return self.theta_s + deltas.to(self.theta_s.dtype), report

    @ieee_float32()
    def removal_leverage(
        self, removed_sets: Sequence[Sequence[int] | Tensor], influence: Tensor | None = None
    ) -> Tensor:
        """``ρ_z = ε uᵀ∇²(Σ_z L_z)(θˢ) u / uᵀ(G+λI)u`` along each influence step
        ``u = θ_influence − θˢ`` (``influence``: ``[M, d]`` from :meth:`influence`, computed
        if None); returns ``[M]``.

        The PBRF's Hessian at θˢ is ``G + λI − ε∇²Σ_z L_z`` (Eqn 8 expanded to second order),
        while influence keeps only ``G + λI`` (Eqn 46). Along ``u`` the PBRF step is
        therefore about ``1/(1 − ρ_z)`` times the influence step: influence underestimates
        removals whose own curvature cancels much of the damped curvature. For a linear
        model with squared error this is exact and ``ρ_z`` is z's leverage
        ``ε x̃ᵀ(G+λI)⁻¹x̃`` (Sherman–Morrison); ``ρ_z ≥ 1`` means the PBRF is not convex
        along ``u`` at θˢ.
        """
        if influence is None:
            influence, _ = self.influence(removed_sets)
        rho = []
        for z, theta in zip(removed_sets, influence, strict=True):
            problem = self.problem(z)
            u = theta - self.theta_s
            own = jvp(grad(problem.removed_loss), (self.theta_s,), (u,))[1]
            rho.append(problem.epsilon * (u @ own) / (u @ self.engine.operator.matvec(u)))
        return torch.stack(rho).detach()

    @ieee_float32()
    def outputs(self, theta: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Raw outputs ``f(θ, x)`` on ``inputs`` (default: the training set)."""
        with torch.no_grad():
            return self.fmodel(theta, self.inputs if inputs is None else self._cast(inputs))

    def predicted_changes(self, influence: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """``∇L_q(θˢ)ᵀ (θ_influence − θˢ)``: influence-predicted test-loss changes ``[M, T]``."""
        grads = self.engine.gradients(self._cast(inputs), self._cast(targets))
        return (influence - self.theta_s) @ grads.T

    def actual_changes(self, thetas: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """``L_q(θ_m) − L_q(θˢ)`` for each row θ_m of ``thetas``, shape ``[M, T]``."""
        base = self.losses(self.theta_s, inputs, targets)
        return torch.stack([self.losses(theta, inputs, targets) - base for theta in thetas])

    @ieee_float32()
    def losses(self, theta: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example losses ``L(f(θ, x), t)``."""
        return self.loss.per_example(self.outputs(theta, inputs), self._cast(targets))


def pearson_spearman(predicted: Tensor, actual: Tensor) -> dict[str, float | None]:
    """Pearson and Spearman correlation of two equally shaped tensors, pooled over all
    entries (``None`` where undefined, e.g. a constant input)."""
    a = predicted.detach().reshape(-1).double().cpu().numpy()
    b = actual.detach().reshape(-1).double().cpu().numpy()
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return {"pearson": None, "spearman": None}
    return {
        "pearson": float(pearsonr(a, b).statistic),
        "spearman": float(spearmanr(a, b).statistic),
    }


@dataclass(frozen=True)
class VerifyArguments:
    """How ``verify`` retrains without a recipe: full-batch L-BFGS (strong Wolfe line
    search, so no learning rate to tune) on the chosen response objective."""

    epsilon: float | None = field(
        default=None, metadata={"help": "Downweighting per removed point; None = 1/N."}
    )
    steps: int = field(
        default=50, metadata={"help": "L-BFGS outer steps (each up to 20 iterations)."}
    )
    solver: str = field(
        default="cg", metadata={"help": "Influence solver: 'exact', 'cg' or 'lissa'."}
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.solver not in ("exact", "cg", "lissa"):
            raise ValueError(f"solver must be 'exact', 'cg' or 'lissa', got {self.solver!r}")


@dataclass
class VerifyResult:
    """Influence-predicted vs retrained test-loss changes, one row per removed point."""

    method: str
    train_indices: list[int]
    predicted: Tensor
    actual: Tensor
    report: dict[str, Any]

    @property
    def correlation(self) -> dict[str, float | None]:
        """Pearson / Spearman over all (point, test) pairs."""
        return pearson_spearman(self.predicted, self.actual)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "method": self.method,
            "train_indices": self.train_indices,
            "predicted": self.predicted.tolist(),
            "actual": self.actual.tolist(),
            **self.correlation,
            "solver_report": self.report,
        }


@ieee_float32()
def verify(
    source: str | Path | tuple[nn.Module, Mapping[str, Any]],
    train_set: TrainingData,
    test_set: TrainingData,
    train_indices: Sequence[int],
    *,
    loss: str = "cross_entropy",
    damping: float = 1e-3,
    weight_decay: float = 0.0,
    hessian: str = "gnh",
    method: str = "pbrf",
    arguments: VerifyArguments | None = None,
    solver: Solver | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> VerifyResult:
    """Check influence estimates by retraining, one removed training point at a time.

    For each i in ``train_indices``: predicted test-loss change
    ``∇L_testᵀ ε (G+λI)⁻¹ ∇L_i`` (Eqn 20) against the actual change
    ``L_test(θ_method) − L_test(θˢ)``, ``method`` = ``pbrf`` (Eqn 8, what influence
    approximates), ``linearized`` (Eqn 10) or ``warm`` (warm-start retraining, Q from θˢ).
    ``source`` is a checkpoint path or ``(model, config)`` with ``config`` a registered
    architecture config (``{"architecture": NAME, ...}``, ``models.build``) that ``model``'s
    state dict fits: the retraining rebuilds the network from ``config``, so a module with
    no such config cannot be checked (:class:`models.ConfigError` says so). ``train_set``
    and ``test_set`` are ``models.Dataset`` objects or ``(inputs, targets)`` tensor pairs.
    No training recipe is needed (see :class:`VerifyArguments`). ``hessian`` (``"gnh"`` or
    ``"full"``), ``damping`` and ``weight_decay`` define the curvature ``G + λI`` as for the
    influence query being checked; ``solver`` (a solver object, e.g. ``CG(tol=1e-8)`` or
    ``LiSSA(depth=2000)``) replaces the default one named by ``arguments.solver``.
    ``device`` runs the solve and the retraining there (``ResponseArguments.device``); the
    result is on the CPU.
    """
    arguments = arguments or VerifyArguments()
    if method not in VERIFY_METHODS:
        raise ValueError(f"method must be one of {list(VERIFY_METHODS)}, got {method!r}")
    if len(train_indices) == 0:
        raise ValueError("train_indices: at least one training index is needed")
    if isinstance(source, str | Path):
        model, config = load_checkpoint(source)
    elif isinstance(source, tuple | list) and len(source) == 2:
        model, config = source
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"source: the model must be a torch.nn.Module, got {type(model).__name__}"
            )
        config = _registered_config(config, "verify")
    else:
        raise TypeError(
            f"source must be a checkpoint path or a (model, config) pair, got {source!r:.80}"
        )
    train_set, test_set = _as_dataset(train_set, "train_set"), _as_dataset(test_set, "test_set")
    recipe = Recipe(
        optimizer="lbfgs", lr=1.0, epochs=arguments.steps, weight_decay=weight_decay,
        loss=get_loss(loss).name, lbfgs_tolerance_grad=1e-10, lbfgs_tolerance_change=0.0,
    )  # fmt: skip
    response = ResponseArguments(
        epsilon=arguments.epsilon, damping=damping, epochs=arguments.steps,
        pbrf_lr_factor=1.0, hessian=hessian, solver=arguments.solver, device=device,
    )  # fmt: skip
    responder = Responder(config, model.state_dict(), recipe, train_set, response, solver=solver)
    removed = [[int(i)] for i in train_indices]
    influence, report = responder.influence(removed)
    predicted = responder.predicted_changes(influence, test_set.inputs, test_set.targets)
    retrained = []
    for k, z in enumerate(removed):
        step = phase_progress(
            progress, k / len(removed), (k + 1) / len(removed), f"retrain:{method}"
        )
        retrained.append(responder.retrain(method, z, step))
        if progress is not None:
            progress((k + 1) / len(removed), f"retrain:{method}")
    actual = responder.actual_changes(torch.stack(retrained), test_set.inputs, test_set.targets)
    indices = [z[0] for z in removed]
    return VerifyResult(method, indices, predicted.cpu(), actual.cpu(), report.to_dict())
