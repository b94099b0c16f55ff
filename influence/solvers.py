"""Solvers for ``(G + λI) X = V`` (inverse-curvature products), each with a report.

Every ``solve(operator, rhs)`` returns ``(X, SolverReport)``; ``rhs`` is ``[d]`` or
``[d, k]`` (k right-hand sides solved together) and the report's relative residual
``‖(G+λI)x − v‖ / ‖v‖`` is always measured on the full-training-set operator (max over
columns; the per-column list is in ``details["residuals"]``).

- ``Exact``: dense matrix, Cholesky (eigendecomposition as fallback), small d only.
- ``CG``: block (preconditioned) conjugate gradients on the full-batch operator.
- ``LiSSA``: the stochastic Neumann recursion of appendix Eqn 49, scale chosen by a
  short Lanczos run (which also certifies an indefinite damped Hessian).
- ``Lanczos``: rank-r eigendecomposition of G, the rest of the spectrum treated as its
  floor ``wd`` (approximate; scales to large d, used for self-influence).

``Exact`` and ``Lanczos`` also ``factorize`` the operator once into an inverse that
can be applied, or whose quadratic form ``vᵀ(G+λI)⁻¹v`` evaluated, many times.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from influence.errors import (
    ConvergenceWarning,
    NegativeCurvatureError,
    NonFiniteError,
    SolverDivergedError,
)
from influence.operators import DampedCurvature, ReplayedCurvature
from models.training import Progress

__all__ = [
    "CG",
    "CholeskyInverse",
    "EigenInverse",
    "Exact",
    "Lanczos",
    "LiSSA",
    "PreconditionerRecipe",
    "Progress",
    "Solver",
    "SolverReport",
    "merge_reports",
    "phase_progress",
    "relative_residuals",
]

Preconditioner = Callable[[Tensor], Tensor]


class PreconditionerRecipe(Protocol):
    """Settings of a preconditioner that is fitted to the operator at solve time (e.g.
    ``influence.nystrom.NystromArguments``)."""

    def build(self, operator: DampedCurvature) -> Preconditioner: ...


@dataclass
class SolverReport:
    """How a solve went: its method, cost, and how far the answer is from exact.

    ``relative_residual`` is the worst ``‖(G+λI)x − v‖/‖v‖`` over the right-hand sides,
    on the full training set. ``converged`` says the method met its own stopping rule:
    always for Exact; CG and LiSSA below their tolerance before their iteration cap; for
    Lanczos, a fixed-rank approximation with no tolerance, it only says the rank was
    built, and ``relative_residual`` is the measure of its accuracy.
    """

    method: str
    iterations: int
    seconds: float
    relative_residual: float
    converged: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return asdict(self)


def merge_reports(reports: Sequence[SolverReport], seconds: float) -> SolverReport:
    """One report for several solves of the same system with different right-hand sides
    (e.g. self-influence chunk by chunk): worst relative residual, converged only if
    every solve converged, the largest iteration count, and ``seconds`` in total.
    ``details`` keeps the first solve's scalar settings, the dict-valued details all
    solves share (e.g. the preconditioner's report), and lists per solve."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    first = reports[0]
    settings = {
        k: v
        for k, v in first.details.items()
        if isinstance(v, str | int | float | bool | None)
        or (isinstance(v, dict) and all(r.details.get(k) == v for r in reports))
    }
    return SolverReport(
        method=first.method,
        iterations=max(r.iterations for r in reports),
        seconds=seconds,
        relative_residual=max(r.relative_residual for r in reports),
        converged=all(r.converged for r in reports),
        details={
            **settings,
            "solves": len(reports),
            "solve_iterations": [r.iterations for r in reports],
            "solve_residuals": [r.relative_residual for r in reports],
            "solve_converged": [r.converged for r in reports],
        },
    )


class Solver(Protocol):
    """Anything with ``solve(operator, rhs, progress) -> (X, SolverReport)``."""

    def solve(
        self, operator: DampedCurvature, rhs: Tensor, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``(G + λI)⁻¹ rhs`` for ``rhs`` ``[d]`` or ``[d, k]``, and its report."""
        ...


def _require(condition: bool, name: str, message: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


def _check_finite(tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{what} contains NaN or infinite values")


def _as_columns(rhs: Tensor, operator: DampedCurvature) -> Tensor:
    if rhs.dim() not in (1, 2) or rhs.shape[0] != operator.size:
        raise ValueError(
            f"rhs must have shape [d] or [d, k] with d = {operator.size}, got {tuple(rhs.shape)}"
        )
    _check_finite(rhs, "right-hand side")
    return rhs.reshape(operator.size, -1).to(device=operator.device, dtype=operator.dtype)


def relative_residuals(operator: DampedCurvature, solution: Tensor, rhs: Tensor) -> Tensor:
    """``‖(G+λI)x_j − v_j‖ / ‖v_j‖`` per column on the full training set (``‖r‖`` if v = 0)."""
    return _relative((operator.matmat(solution) - rhs).norm(dim=0), rhs.norm(dim=0))


def _relative(errors: Tensor, norms: Tensor) -> Tensor:
    """``errors / norms`` per column, the absolute error where a norm is 0."""
    return torch.where(norms > 0, errors / norms.clamp_min(torch.finfo(norms.dtype).tiny), errors)


def _finish(
    method: str,
    operator: DampedCurvature,
    solution: Tensor,
    rhs: Tensor,
    *,
    iterations: int,
    started: float,
    converged: bool,
    shape: torch.Size,
    details: dict[str, Any],
) -> tuple[Tensor, SolverReport]:
    _check_finite(solution, f"{method} solution")
    residuals = relative_residuals(operator, solution, rhs)
    report = SolverReport(
        method=method,
        iterations=iterations,
        seconds=time.perf_counter() - started,
        relative_residual=float(residuals.max()),
        converged=converged,
        details={"residuals": residuals.tolist(), **details},
    )
    return solution.reshape(shape), report


# ----------------------------------------------------------------------------- inverses


@dataclass(frozen=True)
class CholeskyInverse:
    """``(G+λI)⁻¹ = L⁻ᵀ L⁻¹`` from a lower Cholesky factor (float64)."""

    factor: Tensor
    iterations: int = 1

    def solve(self, rhs: Tensor) -> Tensor:
        """``(G+λI)⁻¹ V`` for ``V[d, k]``."""
        return torch.cholesky_solve(rhs.to(self.factor.dtype), self.factor).to(rhs.dtype)

    def quadratic(self, rhs: Tensor) -> Tensor:
        """``v_jᵀ (G+λI)⁻¹ v_j`` per column of ``V[d, k]`` = ``‖L⁻¹ v_j‖²``."""
        half = torch.linalg.solve_triangular(self.factor, rhs.to(self.factor.dtype), upper=False)
        return half.pow(2).sum(dim=0).to(rhs.dtype)


@dataclass(frozen=True)
class EigenInverse:
    """``(G+λI)⁻¹ ≈ U diag(1/μ) Uᵀ + (I − UUᵀ)/μ_rest`` from r eigenpairs (float64).

    ``values`` are the damped eigenvalues μ; ``rest`` is the value assumed for the
    orthogonal complement of U (None when U spans the whole space); ``iterations`` the
    Lanczos steps that built it (1 for a dense eigendecomposition).
    """

    vectors: Tensor
    values: Tensor
    rest: float | None
    iterations: int = 1

    def solve(self, rhs: Tensor) -> Tensor:
        """``(G+λI)⁻¹ V`` for ``V[d, k]`` under this eigen-approximation."""
        v = rhs.to(self.vectors.dtype)
        coords = self.vectors.T @ v
        out = self.vectors @ (coords / self.values[:, None])
        if self.rest is not None:
            out = out + (v - self.vectors @ coords) / self.rest
        return out.to(rhs.dtype)

    def quadratic(self, rhs: Tensor) -> Tensor:
        """``v_jᵀ (G+λI)⁻¹ v_j`` per column of ``V[d, k]``."""
        v = rhs.to(self.vectors.dtype)
        coords = self.vectors.T @ v
        out = (coords.pow(2) / self.values[:, None]).sum(dim=0)
        if self.rest is not None:
            out = out + (v.pow(2).sum(dim=0) - coords.pow(2).sum(dim=0)) / self.rest
        return out.to(rhs.dtype)


def _curvature_advice(operator: DampedCurvature) -> str:
    """What a non-positive curvature value means for ``operator.kind``, and what to do.

    The full Hessian can be indefinite (suggest damping or the GNH); the GNH is PSD, so
    there it can only come from rounding or non-finite values (suggesting the GNH would
    be no advice at all)."""
    if operator.kind == "full":
        return (
            f"the full Hessian can be indefinite: increase damping (now "
            f"{operator.damping:g}) or use hessian='gnh'"
        )
    return (
        "the Gauss-Newton matrix is positive semi-definite, so a non-positive value means "
        "rounding in a (near-)singular matrix, or non-finite values in the model or its "
        f"inputs: raise damping (now {operator.damping:g})"
    )


def _negative_curvature(operator: DampedCurvature, value: float, count: int, how: str) -> None:
    raise NegativeCurvatureError(
        f"the damped {operator.kind} curvature G + λI is not positive definite: {how} "
        f"{value:.4g} ({count} such direction(s)); {_curvature_advice(operator)}",
        value=value,
    )


# ----------------------------------------------------------------------------- Exact


@dataclass(frozen=True)
class Exact:
    """Dense solve of ``(G + λI) x = v`` (the exact iHVP of appendix Eqns 20 and 46):
    build ``G + λI`` (d matrix-vector products) and factor it.

    Cholesky in float64; if that fails, an eigendecomposition tells a numerically
    singular matrix (still solved) from an indefinite one (``NegativeCurvatureError``).
    """

    max_dim: int = field(
        default=20_000,
        metadata={"help": "Largest d for which the dense d×d matrix may be built."},
    )

    def __post_init__(self) -> None:
        _require(self.max_dim >= 1, "max_dim", "must be >= 1", self.max_dim)

    def factorize(
        self, operator: DampedCurvature, progress: Progress | None = None
    ) -> CholeskyInverse | EigenInverse:
        """Build and factor the dense matrix; refuse above ``max_dim`` with the memory needed."""
        d = operator.size
        if d > self.max_dim:
            size = d * d * 8
            unit, scale = next(
                (u, b)
                for u, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))
                if size >= b
            )
            raise ValueError(
                f"Exact solver: d = {d} parameters exceeds max_dim = {self.max_dim}; the dense "
                f"float64 matrix would need {size / scale:.1f} {unit}; use CG or LiSSA instead"
            )
        matrix = operator.dense(progress).to(torch.float64)
        _check_finite(matrix, "curvature matrix G + λI")
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return CholeskyInverse(factor)
        values, vectors = torch.linalg.eigh(matrix)
        if values[0] <= 0:
            _negative_curvature(
                operator, float(values[0]), int((values <= 0).sum()), "smallest eigenvalue is"
            )
        return EigenInverse(vectors, values, rest=None)

    def solve(
        self, operator: DampedCurvature, rhs: Tensor, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``(G + λI)⁻¹ V`` by a dense factorization."""
        started = time.perf_counter()
        columns = _as_columns(rhs, operator)
        inverse = self.factorize(operator, progress)
        solution = inverse.solve(columns)
        return _finish(
            "exact", operator, solution, columns, iterations=1, started=started, converged=True,
            shape=rhs.shape, details={"factorization": type(inverse).__name__},
        )  # fmt: skip


# ----------------------------------------------------------------------------- CG


@dataclass(frozen=True)
class CG:
    """Conjugate gradients on the full-batch ``G + λI``, k right-hand sides at once:
    minimises ``½ xᵀ(G + λI)x − vᵀx`` (appendix Eqn 47) along conjugate directions.

    Each column runs its own CG recursion; all active columns share one operator pass
    per iteration. With a preconditioner ``M⁻¹`` this is PCG. ``converged`` means the
    recursion's residual met ``tol``; the reported residual is recomputed from x and can
    sit above a tol near float32 rounding (both are in the report).
    """

    tol: float = field(
        default=1e-6,
        metadata={"help": "Stop a column when its relative residual ‖r‖/‖v‖ is below this."},
    )
    max_iter: int = field(
        default=500, metadata={"help": "Iteration limit (warns ConvergenceWarning when hit)."}
    )
    preconditioner: Preconditioner | PreconditionerRecipe | None = field(
        default=None,
        metadata={
            "help": "M⁻¹ applied to a [d, k] residual block, or a recipe with "
            "build(operator) fitted at solve time (e.g. NystromArguments()); None for plain CG."
        },
    )

    def __post_init__(self) -> None:
        _require(0 < self.tol < 1, "tol", "must be in (0, 1)", self.tol)
        _require(self.max_iter >= 1, "max_iter", "must be >= 1", self.max_iter)
        _require(
            self.preconditioner is None
            or callable(self.preconditioner)
            or callable(getattr(self.preconditioner, "build", None)),
            "preconditioner",
            "must be callable (M⁻¹ r), a recipe with build(operator), or None",
            self.preconditioner,
        )

    def calibrated(self, operator: DampedCurvature) -> CG:
        """This solver with a preconditioner recipe fitted to ``operator`` once, for many
        solves on the same operator (e.g. self-influence chunk by chunk)."""
        if self.preconditioner is None or callable(self.preconditioner):
            return self
        return replace(self, preconditioner=self.preconditioner.build(operator))

    def solve(
        self, operator: DampedCurvature, rhs: Tensor, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``(G + λI)⁻¹ V`` by (preconditioned) conjugate gradients."""
        started = time.perf_counter()
        precondition = self.calibrated(operator).preconditioner
        if precondition is None:
            precondition = _identity
        b = _as_columns(rhs, operator)
        k = b.shape[1]
        x = torch.zeros_like(b)
        r = b.clone()
        z = precondition(r)
        p = z.clone()
        rz = (r * z).sum(dim=0)
        b_norm = b.norm(dim=0)
        rel = torch.ones(k, dtype=b.dtype, device=b.device)
        rel[b_norm == 0] = 0
        iterations = torch.zeros(k, dtype=torch.long, device=b.device)
        reported = 0.0
        for it in range(1, self.max_iter + 1):
            active = (rel > self.tol).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            p_a = p[:, active]
            ap = operator.matmat(p_a)
            curvature = (p_a * ap).sum(dim=0)
            _check_finite(curvature, f"CG iteration {it}: curvature pᵀ(G+λI)p")
            if (curvature <= 0).any():
                j = int(curvature.argmin())
                value = float(curvature[j] / p_a[:, j].pow(2).sum())
                raise NegativeCurvatureError(
                    f"CG iteration {it}: direction p with pᵀ(G+λI)p/‖p‖² = {value:.4g} <= 0 "
                    f"(right-hand side {int(active[j])}); {_curvature_advice(operator)}",
                    value=value,
                    iteration=it,
                )
            alpha = rz[active] / curvature
            x[:, active] += alpha * p_a
            r_a = r[:, active] - alpha * ap
            r[:, active] = r_a
            rel[active] = r_a.norm(dim=0) / b_norm[active]
            z_a = precondition(r_a)
            rz_new = (r_a * z_a).sum(dim=0)
            p[:, active] = z_a + (rz_new / rz[active]) * p_a
            rz[active] = rz_new
            iterations[active] += 1
            if progress is not None:  # log-residual progress, kept monotone
                done = math.log(1 / max(float(rel.max()), 1e-300)) / math.log(1 / self.tol)
                reported = min(1.0, max(reported, done, it / self.max_iter))
                progress(reported, "solve")
        converged = bool((rel <= self.tol).all())
        if not converged:
            warnings.warn(
                f"CG reached max_iter={self.max_iter} with relative residual "
                f"{float(rel.max()):.3g} > tol={self.tol:g}",
                ConvergenceWarning,
                stacklevel=2,
            )
        method = "cg" if self.preconditioner is None else "pcg"
        return _finish(
            method, operator, x, b, iterations=int(iterations.max()), started=started,
            converged=converged, shape=rhs.shape,
            details={"column_iterations": iterations.tolist(), "tol": self.tol,
                     "recursive_residuals": rel.tolist(),
                     "preconditioned": self.preconditioner is not None,
                     "preconditioner": _describe(precondition)},
        )  # fmt: skip


def _identity(residual: Tensor) -> Tensor:
    return residual


def _describe(preconditioner: Preconditioner) -> dict[str, Any] | None:
    """The preconditioner's own report (rank, fit seconds, ...) where it gives one."""
    report = getattr(preconditioner, "report", None)
    return report() if callable(report) else None


# ----------------------------------------------------------------------------- LiSSA


@dataclass(frozen=True)
class LiSSA:
    """Stochastic Neumann series (appendix Eqn 49, indexed from t = 0 as in docs/engine.md).

    ``x₀ = v``; ``x_t = v + (1 − λ/σ) x_{t−1} − G_B x_{t−1}/σ`` with a fresh minibatch B
    (drawn without replacement) per step; the answer is ``x/σ`` averaged over R repeats.
    It converges only when ``σ > λ_max(G) + λ``, so by default σ = safety · (λ_max + λ)
    with λ_max from a short full-batch Lanczos run (for ``hessian="full"`` the same run
    looks for a direction of negative damped curvature and raises if it finds one).

    Minibatch noise keeps the last iterate ``x_t`` away from the fixed point (on digits
    the residual of ``x_t`` stays above 1), so by default ``x`` is the mean of the recent
    iterates (Polyak–Ruppert tail averaging: same fixed point, noise averaged out). The
    tail grows with t: it starts at the largest ``window·2^j ≤ (1 − average)·t``, so it
    covers between ``average`` and ``(1 + average)/2`` of the iterates so far. The
    recursion stops once that mean changes by less than ``tol`` (relative, per column)
    over one window; ``average=0`` returns the plain ``x_t`` of Eqn 49.
    """

    depth: int = field(
        default=5000, metadata={"help": "Recursion depth T (steps per repeat), at most."}
    )
    repeats: int = field(default=1, metadata={"help": "R, independent recursions averaged."})
    batch_size: int = field(default=128, metadata={"help": "Minibatch size |B| per step."})
    scale: float | None = field(
        default=None,
        metadata={"help": "σ; None: Lanczos estimate of λ_max(G), σ = safety·(λ_max+λ)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the minibatch sampler."})
    average: float = field(
        default=0.5,
        metadata={
            "help": "Averaged tail: at least this fraction of the iterates so far (0: x_t alone)."
        },
    )
    tol: float = field(
        default=1e-2,
        metadata={
            "help": "Early stop once the (averaged) estimate changes by less than this, "
            "relative, over one window."
        },
    )
    window: int = field(
        default=50,
        metadata={"help": "Steps between early-stop checks; the tail starts at window·2^j."},
    )
    safety: float = field(
        default=1.1, metadata={"help": "σ = safety · (λ_max + λ) when scale is None."}
    )
    lanczos_steps: int = field(
        default=100,
        metadata={
            "help": "Full-batch Lanczos products at most for the scale (G: stops once λ_max "
            "has settled; full Hessian: also searches for negative curvature)."
        },
    )
    replay: bool = field(
        default=True,
        metadata={
            "help": "After the first window, replay the minibatch product from a one-off "
            "make_fx trace (same numbers, far less per-op overhead on small models); "
            "False: eager torch.func throughout."
        },
    )

    def __post_init__(self) -> None:
        for name in ("depth", "repeats", "batch_size", "window", "lanczos_steps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, "must be an integer >= 1", value)
        _require(
            self.scale is None or (math.isfinite(self.scale) and self.scale > 0),
            "scale",
            "must be a finite number > 0 or None",
            self.scale,
        )
        _require(0 <= self.average < 1, "average", "must be in [0, 1)", self.average)
        _require(0 < self.tol < 1, "tol", "must be in (0, 1)", self.tol)
        _require(self.safety >= 1, "safety", "must be >= 1", self.safety)

    def solve(
        self, operator: DampedCurvature, rhs: Tensor, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``(G + λI)⁻¹ V`` by the LiSSA recursion, averaged over repeats."""
        started = time.perf_counter()
        v = _as_columns(rhs, operator)
        generator = torch.Generator().manual_seed(self.seed)
        details: dict[str, Any] = {
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "average": self.average,
        }
        if self.scale is None:
            scale, found = self._estimate_scale(operator)
            details.update(found)
        else:
            scale = self.scale
        details["scale"] = scale
        total = torch.zeros_like(v)
        steps: list[int] = []
        settled = True
        replayed = operator.replayed_curvature() if self.replay else None
        for repeat in range(self.repeats):
            report = phase_progress(progress, repeat / self.repeats, (repeat + 1) / self.repeats)
            x, t, done = self._recursion(operator, v, scale, generator, report, replayed)
            total += x / scale
            steps.append(t)
            settled = settled and done
        if not settled:
            warnings.warn(
                f"LiSSA reached depth={self.depth} before its estimate settled "
                f"(tol={self.tol:g}); see the report's relative residual",
                ConvergenceWarning,
                stacklevel=2,
            )
        details["steps"] = steps
        if replayed is not None and max(steps) > self.window:
            details["minibatch_product"] = replayed.last
        return _finish(
            "lissa", operator, total / self.repeats, v, iterations=sum(steps), started=started,
            converged=settled, shape=rhs.shape, details=details,
        )  # fmt: skip

    def _estimate_scale(self, operator: DampedCurvature) -> tuple[float, dict[str, Any]]:
        """σ = safety · (λ_max + λ), and what the Lanczos run found (for the report).
        Its start vector has a generator of its own, so the minibatch draws of a solve
        are the same whether σ was estimated in it or by :meth:`calibrated`."""
        generator = torch.Generator().manual_seed(self.seed)
        found = _extreme_curvature(operator, generator, min(self.lanczos_steps, operator.size))
        return self.safety * (found["lambda_max"] + operator.damping), found

    def calibrated(self, operator: DampedCurvature) -> LiSSA:
        """This solver with σ fixed for ``operator`` (the Lanczos run done once here when
        ``scale`` is None), for many solves on the same operator."""
        if self.scale is not None:
            return self
        return replace(self, scale=self._estimate_scale(operator)[0])

    def _recursion(
        self,
        operator: DampedCurvature,
        v: Tensor,
        scale: float,
        generator: torch.Generator,
        progress: Progress | None,
        replayed: ReplayedCurvature | None,
    ) -> tuple[Tensor, int, bool]:
        """One repeat: the (tail-averaged) iterate, the steps taken, and whether it settled.
        Minibatch products are eager for the first window, then ``replayed`` if given."""
        n = operator.num_examples
        floor = operator.damping + (operator.weight_decay if operator.kind == "gnh" else 0.0)
        # ‖x_t‖ ≤ σ‖v‖/λ_min(G+λI) while the recursion contracts; 10× that means divergence.
        bound = 10 * scale / floor * float(v.norm(dim=0).max()) if floor > 0 else math.inf
        keep = 1 - self.average  # the averaged tail starts at or below keep·t
        x = v.clone()
        start, tail = 0, torch.zeros_like(v)  # tail = Σ x_u for start < u ≤ t
        upcoming = self.window  # next start of the schedule window·2^j
        pending: list[tuple[int, Tensor]] = []  # (s, Σ x_u for s < u ≤ t), later starts
        previous: Tensor | None = None
        curvature = operator.curvature
        for t in range(1, self.depth + 1):
            if t == self.window + 1 and replayed is not None:
                curvature = replayed
            batch = torch.randperm(n, generator=generator)[: self.batch_size].to(v.device)
            x = v + (1 - operator.damping / scale) * x - curvature(x, batch) / scale
            norm = float(x.norm(dim=0).max())
            if math.isnan(norm):
                raise NonFiniteError(
                    f"LiSSA step {t}: the minibatch curvature product is NaN (non-finite "
                    f"training data or parameters)"
                )
            if math.isinf(norm) or norm > bound:
                _diverged(operator, x, t, norm, bound, scale)
            if self.average > 0:
                if t > upcoming:
                    pending.append((upcoming, torch.zeros_like(v)))
                    upcoming *= 2
                tail += x
                for _, later in pending:
                    later += x
                while pending and keep * t >= pending[0][0]:
                    start, tail = pending.pop(0)
            if t % self.window == 0:
                if progress is not None:
                    progress(t / self.depth, "solve")
                if self.average > 0 and start == 0:
                    continue  # still in burn-in: no tail yet
                estimate = x if self.average == 0 else tail / (t - start)
                if previous is not None:
                    # a column that is zero and stays zero has settled
                    change = _relative((estimate - previous).norm(dim=0), estimate.norm(dim=0))
                    if float(change.max()) < self.tol:
                        return estimate, t, True
                previous = estimate.clone()
        final = x if self.average == 0 else tail / (self.depth - start)
        return final, self.depth, False


def phase_progress(
    progress: Progress | None, low: float, high: float, phase: str | None = None
) -> Progress | None:
    """Map a sub-task's progress fraction onto [low, high] of the whole task (reported
    under ``phase`` when given, else under the sub-task's own phase)."""
    if progress is None:
        return None
    return lambda fraction, own: progress(low + (high - low) * fraction, phase or own)


def _rayleigh(operator: DampedCurvature, u: Tensor) -> float:
    """``uᵀ G u / uᵀu`` on the full training set (weight decay in, damping out)."""
    return float(u @ operator.curvature(u) / (u @ u))


_RITZ_TOL = 1e-2
"""The top Ritz value θ has settled once its residual bound is ≤ this · θ."""


def _extreme_curvature(
    operator: DampedCurvature, generator: torch.Generator, steps: int
) -> dict[str, Any]:
    """λ_max(G) for LiSSA's scale, by at most ``steps`` full-batch Lanczos products.

    The top Ritz pair (θ, s) of the Lanczos matrix has residual bound ρ = β_m |s_m|: some
    eigenvalue of G lies in [θ − ρ, θ + ρ]. The run stops once ρ ≤ 1e-2·θ and returns
    ``θ + ρ``. For the full Hessian it also watches the lowest Ritz value: when that
    reaches ≤ −λ, its Ritz vector y is checked with one more product, and
    ``yᵀ(G+λI)y/‖y‖² ≤ 0`` proves ``G + λI`` indefinite (``NegativeCurvatureError``).
    Lanczos cannot prove the opposite (a small residual bound near the bottom only shows
    some eigenvalue nearby, and the Hessian's eigenvalues crowd around 0), so for the
    full Hessian the run takes all ``steps`` and the report keeps the lowest Ritz value.
    """
    full = operator.kind == "full"
    damping = operator.damping
    state: dict[str, Any] = {"checked_below": -damping, "certificates": 0}

    def stop(basis: Tensor, alphas: list[float], betas: list[float], beta: float) -> bool:
        ritz, coords = _ritz(alphas, betas)
        top, low = float(ritz[-1]), float(ritz[0])
        top_bound = beta * float(coords[-1, -1].abs())
        state["lambda_max"] = top + top_bound
        if not full:
            return top_bound <= _RITZ_TOL * abs(top)
        state["lowest"] = low
        if low <= state["checked_below"]:
            state["certificates"] += 1
            ritz_vector = basis @ coords[:, 0].to(basis.device)
            damped = _rayleigh(operator, ritz_vector.to(operator.dtype)) + damping
            if damped <= 0:
                _negative_curvature(operator, damped, int((ritz + damping <= 0).sum()),
                                    "a Lanczos Ritz vector y has yᵀ(G+λI)y/‖y‖² =")  # fmt: skip
            state["checked_below"] = low - 0.1 * abs(low)  # rounding: look again lower down
        return False

    _, alphas, _ = _lanczos(operator, generator, steps, stop=stop, room=16)
    found: dict[str, Any] = {
        "lambda_max": state["lambda_max"],
        "scale_products": len(alphas) + state["certificates"],
    }
    if full:
        found["lowest_ritz_damped"] = state["lowest"] + damping
    return found


def _diverged(
    operator: DampedCurvature, x: Tensor, step: int, norm: float, bound: float, scale: float
) -> None:
    if operator.kind == "full" and math.isfinite(norm):
        j = int(x.norm(dim=0).argmax())
        damped = _rayleigh(operator, x[:, j]) + operator.damping
        if damped <= 0:
            _negative_curvature(operator, damped, 1, "LiSSA's growing iterate has uᵀ(G+λI)u/‖u‖² =")
    raise SolverDivergedError(
        f"LiSSA diverged at step {step}: iterate norm {norm:.3g} exceeds the bound {bound:.3g}; "
        f"the scale σ = {scale:.4g} is too small: it must exceed "
        f"λ_max(G) + λ, and minibatch curvature can be larger than the full-batch one "
        f"(use scale=None, or raise safety or batch_size)"
    )


# ----------------------------------------------------------------------------- Lanczos

LanczosStop = Callable[[Tensor, list[float], list[float], float], bool]


def _lanczos(
    operator: DampedCurvature,
    generator: torch.Generator,
    steps: int,
    *,
    progress: Progress | None = None,
    stop: LanczosStop | None = None,
    room: int | None = None,
) -> tuple[Tensor, list[float], list[float]]:
    """Lanczos tridiagonalization of G (weight decay in, damping out) from a random unit
    vector, full reorthogonalization, float64: ``G Q ≈ Q T`` with ``T`` tridiagonal.

    Returns the basis ``Q[d, m]``, T's diagonal α (m values) and off-diagonal β (m − 1).
    Stops after ``steps`` products, when the Krylov space is exhausted, or when
    ``stop(Q, α, β, β_next)`` is true (``β_next``, the norm of the last step's residual,
    bounds how far each Ritz pair of T is from an eigenpair of G). The basis starts with
    ``room`` columns (default ``steps``) and doubles as needed, so that a run likely to
    stop early need not hold the whole d × steps float64 basis.
    """
    d = operator.size
    q = torch.randn(d, generator=generator, dtype=torch.float64).to(operator.device)
    basis = torch.zeros(d, min(steps, room or steps), dtype=torch.float64, device=operator.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = q / q.norm()
    for j in range(steps):
        if j == basis.shape[1]:
            more = min(steps, 2 * j) - j
            basis = torch.cat([basis, basis.new_zeros(d, more)], dim=1)
        basis[:, j] = q
        w = operator.curvature(q.to(operator.dtype)).to(torch.float64)
        _check_finite(w, f"Lanczos step {j}: G·q")
        alphas.append(float(q @ w))
        if progress is not None:
            progress((j + 1) / steps, "curvature")
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta = float(w.norm())
        if stop is not None and stop(basis[:, : j + 1], alphas, betas, beta):
            break
        if j == steps - 1 or beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        q = w / beta
    return basis[:, : len(alphas)], alphas, betas


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs (ascending) of the Lanczos tridiagonal matrix T (float64)."""
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: m - 1], dtype=torch.float64)
    tri += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(tri)


# ----------------------------------------------------------------------------- Lanczos solver


@dataclass(frozen=True)
class Lanczos:
    """Rank-r eigendecomposition of G by Lanczos (full reorthogonalization); the rest of
    the spectrum is treated as G's floor ``wd`` (damped: ``wd + λ``). Approximate."""

    rank: int = field(default=64, metadata={"help": "Number r of top eigenpairs kept."})
    iterations: int | None = field(
        default=None,
        metadata={"help": "Lanczos steps (full-batch products); None means 2·rank."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the starting vector."})

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "rank", "must be >= 1", self.rank)
        _require(
            self.iterations is None or self.iterations >= self.rank,
            "iterations",
            "must be >= rank or None",
            self.iterations,
        )

    def steps(self, d: int) -> int:
        """Number of Lanczos steps (full-batch G products) for dimension d, at most."""
        return min(d, self.iterations or 2 * self.rank)

    def factorize(
        self, operator: DampedCurvature, progress: Progress | None = None
    ) -> EigenInverse:
        """Top-r Ritz pairs of G as an approximate ``(G + λI)⁻¹``."""
        d = operator.size
        steps = self.steps(d)
        generator = torch.Generator().manual_seed(self.seed)
        basis, alphas, betas = _lanczos(operator, generator, steps, progress=progress)
        m = len(alphas)
        ritz, coords = _ritz(alphas, betas)
        lowest = float(ritz[0]) + operator.damping
        if lowest <= 0:
            _negative_curvature(operator, lowest, int((ritz + operator.damping <= 0).sum()),
                                "a Lanczos Ritz value of G + λI is")  # fmt: skip
        keep = min(self.rank, m)
        vectors = basis[:, :m] @ coords[:, -keep:].to(basis.device)
        values = (ritz[-keep:] + operator.damping).to(basis.device)
        rest = None if keep == d else operator.weight_decay + operator.damping
        if rest is not None and rest <= 0:
            raise ValueError(
                "Lanczos treats the spectrum beyond its rank as weight_decay + damping, "
                "which is 0 here: set damping > 0"
            )
        return EigenInverse(vectors, values, rest, iterations=m)

    def solve(
        self, operator: DampedCurvature, rhs: Tensor, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """Approximate ``(G + λI)⁻¹ V`` from the low-rank eigendecomposition."""
        started = time.perf_counter()
        columns = _as_columns(rhs, operator)
        inverse = self.factorize(operator, progress)
        solution = inverse.solve(columns)
        return _finish(
            "lanczos", operator, solution, columns, iterations=inverse.iterations,
            started=started, converged=True, shape=rhs.shape,
            details={"rank": len(inverse.values), "top_eigenvalue": float(inverse.values[-1])},
        )  # fmt: skip
