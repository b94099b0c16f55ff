"""Randomized Nyström preconditioner for CG on the damped curvature ``G + λI``.

Frangella, Tropp & Udell, "Randomized Nyström preconditioning" (SIAM J. Matrix Anal.
Appl. 2023). A sketch ``Y = G_S Ω`` with ``s`` Gaussian test vectors ``Ω[d, s]`` gives
the Nyström approximation

    Ĝ = Y (Ωᵀ Y)⁻¹ Yᵀ = U Λ̂ Uᵀ,      U[d, s] orthonormal, Λ̂ ≥ 0,

computed stably with a small shift ν (Tropp et al. 2017): ``Y_ν = Y + νΩ``,
``Ωᵀ Y_ν = L Lᵀ``, ``Y_ν = Q R``, ``R L⁻ᵀ = W Σ Vᵀ``, so ``U = Q W`` and
``Λ̂ = Σ² − ν`` (pairs with ``Λ̂ ≤ ν``, rounding noise, are dropped). The preconditioner is

    P⁻¹ = (λ̂_s + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ),      μ = λ + wd,

``λ̂_s`` the smallest kept eigenvalue: the top directions of ``G + λI`` are brought down
to the level ``λ̂_s + μ`` of the rest of the spectrum, so PCG's condition number is
about ``(λ_s + μ)/μ`` instead of ``(λ_max + μ)/μ``.

``G_S`` is the data part of ``G`` (appendix Eqn 45, ``(1/N) Σ_i J_iᵀ H_i J_i``; the
``wd·I`` part is μ's share) restricted to a subset ``S`` of ``examples`` training points,
which makes the sketch cheaper by ``|S|/N``:

- ``selection="curvature"`` (default): the ``|S|`` examples with the largest
  ``tr(J_iᵀ H_i J_i)`` (Hutchinson estimates ``E_z[(J_i z)ᵀ H_i (J_i z)]``, z Gaussian:
  one forward-mode pass per probe over the data), summed, ``G_S = (1/N) Σ_{i∈S}``;
  a well-fit network's curvature sits on its few uncertain examples;
- ``selection="random"``: a uniform random subset, averaged, ``G_S = (1/|S|) Σ_{i∈S}``.

CG itself always uses the exact full-batch operator, so the answer is exact to CG's
tolerance whatever the sketch; only the iteration count depends on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import jvp, vmap

from influence.errors import NegativeCurvatureError, NonFiniteError
from influence.functional import batch_slices, dataset_product
from influence.operators import DampedCurvature

__all__ = ["NystromArguments", "NystromPreconditioner"]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class NystromArguments:
    """Size and data of the Nyström sketch."""

    rank: int = field(
        default=100,
        metadata={"help": "Sketch size s (Gaussian test vectors); at most d are used."},
    )
    examples: int | None = field(
        default=None,
        metadata={"help": "Training examples |S| the sketch of G is taken on; None: all N."},
    )
    selection: Literal["curvature", "random"] = field(
        default="curvature",
        metadata={
            "help": "How S is chosen when examples < N: 'curvature' (largest "
            "tr(J_iᵀ H_i J_i), summed) or 'random' (uniform, averaged)."
        },
    )
    probes: int = field(
        default=4,
        metadata={"help": "Hutchinson probes per example for selection='curvature'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of Ω, the probes and the subset."})
    columns_per_pass: int = field(
        default=32,
        metadata={"help": "Test vectors pushed through one curvature pass (memory vs speed)."},
    )

    def __post_init__(self) -> None:
        for name in ("rank", "probes", "columns_per_pass"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.examples is not None and not _positive_int(self.examples):
            raise ValueError(f"examples must be an integer >= 1 or None, got {self.examples!r}")
        if self.selection not in ("curvature", "random"):
            raise ValueError(f"selection must be 'curvature' or 'random', got {self.selection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def build(self, operator: DampedCurvature) -> NystromPreconditioner:
        """The preconditioner these settings describe, fitted to ``operator`` (what
        ``CG(preconditioner=NystromArguments(...))`` calls at solve time)."""
        return NystromPreconditioner.fit(operator, self)


class NystromPreconditioner:
    """``P⁻¹ ≈ (G + λI)⁻¹`` up to scale, from a rank-s Nyström approximation of ``G``.

    Build with :meth:`fit`; pass as ``CG(preconditioner=...)``; call on ``[d]`` or
    ``[d, k]``. Attributes: ``basis`` (Uᵀ, ``[r, d]``, r ≤ s; ``vectors`` is U),
    ``values`` (Λ̂ > 0, descending), ``mu`` (λ + wd), ``examples`` (|S|), ``indices``
    (S, sorted; None for all N), ``seconds`` (fit time).
    """

    def __init__(
        self,
        basis: Tensor,
        values: Tensor,
        mu: float,
        *,
        examples: int,
        indices: Tensor | None,
        seconds: float,
        arguments: NystromArguments,
    ) -> None:
        if mu <= 0:
            raise ValueError(f"mu = damping + weight_decay must be > 0, got {mu!r}")
        self.basis = basis
        self.values = values
        self.mu = mu
        self.examples = examples
        self.indices = indices
        self.seconds = seconds
        self.arguments = arguments
        floor = (float(values[-1]) if len(values) else 0.0) + mu
        # P⁻¹ v = v + U (c − 1) Uᵀ v,  c_i = (λ̂_s + μ) / (λ̂_i + μ)
        self._shrink = (floor / (values + mu) - 1).to(basis.dtype)

    @property
    def vectors(self) -> Tensor:
        """U, ``[d, r]``, orthonormal columns (a view of ``basis``)."""
        return self.basis.T

    @property
    def dim(self) -> int:
        """d, the length of the vectors it applies to."""
        return self.basis.shape[1]

    @property
    def rank(self) -> int:
        """r, the number of eigenpairs kept (≤ the sketch size)."""
        return self.basis.shape[0]

    @classmethod
    def fit(
        cls,
        operator: DampedCurvature,
        arguments: NystromArguments | None = None,
        **overrides: Any,
    ) -> NystromPreconditioner:
        """Sketch ``G_S Ω`` and build ``P⁻¹``; settings from ``arguments`` and/or keyword
        overrides of its fields (``rank=``, ``examples=``, ``selection=``, ...)."""
        arguments = replace(arguments or NystromArguments(), **overrides)
        started = time.perf_counter()
        if operator.kind != "gnh":
            raise ValueError(
                "the Nyström preconditioner sketches the positive semi-definite Gauss-Newton "
                f"curvature; got hessian={operator.kind!r}: use hessian='gnh', or CG without "
                "a preconditioner"
            )
        mu = operator.damping + operator.weight_decay
        if mu <= 0:
            raise ValueError("the Nyström preconditioner needs damping + weight_decay > 0")
        d, n = operator.size, operator.num_examples
        generator = torch.Generator().manual_seed(arguments.seed)
        indices, scale = None, 1.0
        if arguments.examples is not None and arguments.examples < n:
            if arguments.selection == "curvature":
                weights = _curvature_weights(operator, arguments.probes, generator)
                indices = weights.topk(arguments.examples).indices.sort().values
                scale = arguments.examples / n
            else:
                indices = torch.randperm(n, generator=generator)[: arguments.examples].sort().values
            indices = indices.to(operator.device)
        s = min(arguments.rank, d)
        # Ω and Y are kept transposed, [s, d] row-major: the fast layout for the d-long
        # matrix products below and in __call__.
        omega = torch.randn(s, d, generator=generator, dtype=operator.dtype).to(operator.device)
        if 4 * s > d:  # square-ish Gaussian Ω can be ill-conditioned: orthonormalise
            omega = torch.linalg.qr(omega.T).Q.T.contiguous()
        else:  # rows near-orthonormal already (cond(Ω) ≤ 3); Nyström is invariant to Ω → ΩR
            omega /= math.sqrt(d)
        inputs, targets = operator.inputs, operator.targets
        if indices is not None:
            inputs, targets = inputs[indices], targets[indices]
        sketch = torch.empty_like(omega)
        for lo in range(0, s, arguments.columns_per_pass):
            block = omega[lo : lo + arguments.columns_per_pass].T
            product = dataset_product(
                operator.kind, operator.fmodel, operator.loss, operator.theta, inputs, targets,
                block, operator.batch_size,
            )  # fmt: skip
            sketch[lo : lo + block.shape[1]] = scale * product.T
        basis, values = _stable_nystrom(omega, sketch)
        return cls(
            basis,
            values,
            mu,
            examples=n if indices is None else len(indices),
            indices=indices,
            seconds=time.perf_counter() - started,
            arguments=arguments,
        )

    def __call__(self, v: Tensor) -> Tensor:
        """``P⁻¹ v`` for ``v`` of shape ``[d]`` or ``[d, k]``."""
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(
                f"expected a vector [{self.dim}] or matrix [{self.dim}, k], got {tuple(v.shape)}"
            )
        basis, shrink = self.basis.to(v.dtype), self._shrink.to(v.dtype)
        rows = v.reshape(self.dim, -1).T  # [k, d]
        correction = ((rows @ basis.T) * shrink) @ basis
        return v + correction.T.reshape(v.shape)

    def report(self) -> dict[str, Any]:
        """Rank kept, examples sketched, fit seconds, the range of Λ̂ and μ."""
        return {
            "rank": self.rank,
            "sketch_size": min(self.arguments.rank, self.dim),
            "examples": self.examples,
            "selection": self.arguments.selection,
            "fit_seconds": self.seconds,
            "lambda_max": float(self.values[0]) if self.rank else 0.0,
            "lambda_min": float(self.values[-1]) if self.rank else 0.0,
            "mu": self.mu,
        }


def _curvature_weights(
    operator: DampedCurvature, probes: int, generator: torch.Generator
) -> Tensor:
    """Hutchinson estimates of ``tr(J_iᵀ H_i J_i)`` per training example, ``[N]``."""
    z = torch.randn(probes, operator.size, generator=generator, dtype=operator.dtype)
    z = z.to(operator.device)
    weights = []
    for sl in batch_slices(operator.num_examples, operator.batch_size):
        inputs, targets = operator.inputs[sl], operator.targets[sl]

        def quadratic(direction: Tensor, x: Tensor = inputs, t: Tensor = targets) -> Tensor:
            outputs, jz = jvp(lambda p: operator.fmodel(p, x), (operator.theta,), (direction,))
            hjz = operator.loss.output_hvp(outputs, t, jz)
            return (jz * hjz).reshape(len(x), -1).sum(dim=1)

        weights.append(vmap(quadratic)(z).mean(dim=0))
    return torch.cat(weights)


def _stable_nystrom(omega: Tensor, sketch: Tensor) -> tuple[Tensor, Tensor]:
    """``(Uᵀ [r, d], Λ̂ [r])`` of the shifted Nyström approximation from ``Ωᵀ`` and
    ``Yᵀ = (G Ω)ᵀ`` (both ``[s, d]``, both overwritten); eigenvalues descending, pairs
    with ``Λ̂ ≤ ν`` dropped."""
    norm = float(sketch.norm())
    if not math.isfinite(norm):
        raise NonFiniteError("Nyström sketch G·Ω contains NaN or infinite values")
    nu = math.sqrt(sketch.shape[1]) * torch.finfo(sketch.dtype).eps * norm
    shifted = sketch.add_(omega, alpha=nu)  # Y_ν = (G + νI) Ω, in place
    core = (omega @ shifted.T).double()
    core = (core + core.T) / 2
    lower, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(core)[0])
        raise NegativeCurvatureError(
            f"Nyström sketch: Ωᵀ(G + νI)Ω is not positive definite (smallest eigenvalue "
            f"{smallest:.4g}): the sketch lost positive definiteness to rounding; fit it in "
            f"float64 or with a smaller rank",
            value=smallest,
        )
    r_factor, q_rows = _orthonormalise(shifted)
    factor = torch.linalg.solve_triangular(lower.T, r_factor, upper=True, left=False)
    w, sigma, _ = torch.linalg.svd(factor)
    values = sigma.square() - nu
    keep = values > nu  # the rest is rounding noise of the sketch
    return q_rows(w[:, keep], omega), values[keep]


_CHUNK = 16_384  # columns of Yᵀ converted to float64 at a time


def _orthonormalise(rows: Tensor) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """For ``Y = rowsᵀ`` (``[d, s]``): R of ``Y = Q R`` (float64, ``[s, s]``) and the map
    ``(B, out) ↦ (Q B)ᵀ`` written into the storage of ``out`` (``[s, d]``, Y's dtype).

    float64: Householder QR. Lower precisions: Cholesky QR with a float64 Gram matrix
    accumulated in column chunks, ``R = chol(YᵀY)ᵀ``, ``Q = Y R⁻¹``: as accurate as
    Householder for ``cond(Y)² ≪ 1/eps₆₄``, which the shift ν guarantees for tall Y
    (``cond(Y_ν) ≲ 1/(√d eps₃₂)``), and several times cheaper.
    """
    if rows.dtype == torch.float64:
        q, r = torch.linalg.qr(rows.T)
        return r, lambda b, out: (q @ b).T.contiguous()
    d = rows.shape[1]
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=rows.device)
    for lo in range(0, d, _CHUNK):
        chunk = rows[:, lo : lo + _CHUNK].double()
        gram += chunk @ chunk.T
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise NonFiniteError("Nyström sketch: Y_ν is numerically rank-deficient")
    r = lower.T

    def q_rows(b: Tensor, out: Tensor) -> Tensor:
        transform = torch.linalg.solve_triangular(r, b, upper=True).T  # [r, s]: (R⁻¹B)ᵀ
        out = out[: len(transform)]
        for lo in range(0, d, _CHUNK):
            out[:, lo : lo + _CHUNK] = transform @ rows[:, lo : lo + _CHUNK].double()
        return out

    return r, q_rows
