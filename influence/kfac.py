"""Kronecker-factored approximation of the damped Gauss-Newton matrix, as a CG preconditioner.

For an ``nn.Linear`` layer ``s = W a + b`` the per-example Gauss-Newton block of the
parameters ``[W | b]`` is ``Σ_c (g_c g_cᵀ) ⊗ (ā āᵀ)`` with ``ā = [a; 1]`` and ``g_c`` the
pre-activation gradient of ``r_cᵀ y``, where ``H_y = Σ_c r_c r_cᵀ`` factorises the loss
Hessian in output space (appendix B, the ``Jᵀ H_y J`` of Eqn 50's curvature). K-FAC
(Martens & Grosse 2015) replaces the mean of Kronecker products by the Kronecker product
of means, ``G_layer ≈ S ⊗ A`` with

    A = (1/N) Σ_i ā_i ā_iᵀ,      S = (1/N) Σ_i Σ_c g_ic g_icᵀ.

A layer applied at each of T positions of a sequence sums its Kronecker terms over the
positions; A then averages over the N·T position rows and S sums each example's
positions ("expand" K-FAC), so ``tr(S ⊗ A)`` does not grow with T.

The factorisation of ``H_y`` is exact, not sampled: each example's ``H_y`` is built from
``models.losses`` (``output_hvp`` on the output basis) and square-rooted by ``eigh``, so
``S ⊗ A`` is exact whenever one example (or one layer fed by the inputs under MSE) makes
the Kronecker factorisation exact; it costs one ``vjp`` per output dimension per batch.

Damping adds ``γ = weight_decay + λ`` (the curvature is ``G + λI`` with ``G`` holding
``wd·I``). All three approximations work in the Kronecker eigenbasis ``Q_S ⊗ Q_A``
(each factor is eigendecomposed once) and differ in the eigenvalues they put there:

- ``"kfac-pi"``: ``(S + π√γ I) ⊗ (A + √γ/π I)``, damping split between the factors with
  the π-correction, ``π² = (tr A / dim A) / (tr S / dim S)`` (Martens & Grosse 2015);
- ``"kfac"``: ``S ⊗ A + γI`` inverted exactly (eigenvalues ``s_i a_j + γ``);
- ``"ekfac"`` (default): the eigenvalues are replaced by the exact diagonal of ``G``'s
  layer block in that basis, ``(1/N) Σ_i Σ_c ((Q_Sᵀ g_ic)_s (Q_Aᵀ ā_i)_a)²``, plus ``γ``
  (George et al. 2018); one more pass over the data. Layers applied per position
  (sequence inputs) keep the K-FAC eigenvalues.

Applying the inverse costs four small matrix products per layer.

Parameters outside fully trainable ``nn.Linear`` layers (convolutions, embeddings,
norms, a Linear whose bias is frozen, ...) get a Jacobi block: the exact diagonal of
``G`` (from per-example gradients of ``r_cᵀ y``) plus ``γ``.

Vectors use the engine's flat parameter order: ``model.named_parameters()`` with
``requires_grad``, each tensor flattened row-major.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from influence.operators import DampedCurvature
from models.losses import Loss, get_loss

__all__ = ["KFAC", "KFACArguments"]


@dataclass(frozen=True)
class KFACArguments:
    """How the Kronecker factors are estimated and damped."""

    approximation: Literal["ekfac", "kfac", "kfac-pi"] = field(
        default="ekfac",
        metadata={
            "help": "'ekfac': Kronecker eigenbasis with exact per-direction curvature; "
            "'kfac': S⊗A+γI inverted exactly; 'kfac-pi': (S+π√γI)⊗(A+√γ/πI)."
        },
    )
    batch_size: int = field(
        default=512,
        metadata={"help": "Training examples per pass while accumulating the factors."},
    )
    max_output_dim: int = field(
        default=1024,
        metadata={
            "help": "Largest per-example output size whose loss Hessian is factorised "
            "exactly (one backward pass per output dimension)."
        },
    )

    def __post_init__(self) -> None:
        if self.approximation not in ("ekfac", "kfac", "kfac-pi"):
            raise ValueError(
                f"approximation must be 'ekfac', 'kfac' or 'kfac-pi', got {self.approximation!r}"
            )
        for name in ("batch_size", "max_output_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class _LinearBlock:
    """One Linear layer's factors, their eigenbases, and where its parameters sit."""

    name: str
    index: Tensor  # [out, in(+1)] flat positions of [W | b]
    s_basis: Tensor
    a_basis: Tensor
    eigenvalues: Tensor  # [out, in(+1)] damped eigenvalues of M's block in Q_S ⊗ Q_A


class KFAC:
    """``M⁻¹ ≈ (G + λI)⁻¹`` applied blockwise; call it on ``[d]`` or ``[d, k]`` flat vectors.

    Build with :meth:`KFAC.fit`; pass the object as ``CG(preconditioner=...)``.
    """

    def __init__(
        self,
        blocks: list[_LinearBlock],
        diagonal_index: Tensor,
        diagonal: Tensor,
        dim: int,
        gamma: float,
        arguments: KFACArguments,
        seconds: float,
    ) -> None:
        self.blocks = blocks
        self.diagonal_index = diagonal_index
        self.diagonal = diagonal
        self.dim = dim
        self.gamma = gamma
        self.arguments = arguments
        self.seconds = seconds

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        loss: str | Loss,
        inputs: Tensor,
        targets: Tensor,
        *,
        damping: float,
        weight_decay: float = 0.0,
        arguments: KFACArguments | None = None,
    ) -> KFAC:
        """Estimate the factors of ``G + λI`` over the training set ``(inputs, targets)``.

        ``G = (1/N) Σ_i J_iᵀ H_i J_i + wd·I`` (docs/engine.md, Conventions); ``λ = damping``.
        """
        arguments = arguments or KFACArguments()
        loss = get_loss(loss)
        if damping < 0 or weight_decay < 0 or not math.isfinite(damping + weight_decay):
            raise ValueError(
                f"damping and weight_decay must be finite and >= 0, got {damping}, {weight_decay}"
            )
        if damping + weight_decay <= 0:
            raise ValueError("K-FAC needs damping + weight_decay > 0 to be invertible")
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(
                f"train inputs and targets must be non-empty and of equal length, "
                f"got {len(inputs)} and {len(targets)}"
            )
        start = time.perf_counter()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no parameter with requires_grad")
        first = next(iter(params.values()))
        offsets, dim = {}, 0
        for n, p in params.items():
            offsets[n] = dim
            dim += p.numel()

        linears = _trainable_linears(model, params)
        covered = {f"{prefix}.{k}" if prefix else k for prefix, m in linears for k in _names(m)}
        fallback = [n for n in params if n not in covered]

        a_sums = [_zeros_square(m.in_features + (m.bias is not None), first) for _, m in linears]
        a_rows = [0] * len(linears)  # examples, or examples × positions for sequence inputs
        s_sums = [_zeros_square(m.out_features, first) for _, m in linears]
        diag_sums = {n: torch.zeros_like(params[n]) for n in fallback}

        n_total = len(inputs)

        def batches():
            for lo in range(0, n_total, arguments.batch_size):
                x = inputs[lo : lo + arguments.batch_size].to(first.device)
                t = targets[lo : lo + arguments.batch_size].to(first.device)
                x = x.to(first.dtype) if x.is_floating_point() else x
                yield x, _linear_statistics(model, linears, loss, x, t, arguments)

        for x, (roots, acts, pre_grads) in batches():
            for j, (a, g) in enumerate(zip(acts, pre_grads, strict=True)):
                a_sums[j] += a.T @ a
                a_rows[j] += len(a)
                s_sums[j] += torch.einsum("cbo,cbp->op", g, g)
            if fallback:
                _accumulate_diagonal(model, params, fallback, x, roots, diag_sums)

        gamma = float(damping + weight_decay)
        bases = [
            _eigenbasis(a_sum / rows, s_sum / n_total, gamma, arguments.approximation)
            for a_sum, rows, s_sum in zip(a_sums, a_rows, s_sums, strict=True)
        ]
        if arguments.approximation == "ekfac":
            corrected = [torch.zeros_like(eigenvalues) for _, _, eigenvalues in bases]
            for x, (_, acts, pre_grads) in batches():
                for j, (a, g) in enumerate(zip(acts, pre_grads, strict=True)):
                    if len(a) == len(x):  # one input vector per example
                        s_basis, a_basis, _ = bases[j]
                        g_rot, a_rot = (g @ s_basis).square(), (a @ a_basis).square()
                        corrected[j] += torch.einsum("cbs,ba->sa", g_rot, a_rot)
                    else:
                        corrected[j] = None
            bases = [
                (s_basis, a_basis, eigenvalues if fix is None else fix / n_total + gamma)
                for (s_basis, a_basis, eigenvalues), fix in zip(bases, corrected, strict=True)
            ]
        blocks = [
            _LinearBlock(prefix, _block_index(prefix, module, offsets), *basis)
            for (prefix, module), basis in zip(linears, bases, strict=True)
        ]
        if fallback:
            diagonal_index = torch.cat(
                [
                    torch.arange(offsets[n], offsets[n] + params[n].numel(), device=first.device)
                    for n in fallback
                ]
            )
            diagonal = torch.cat([diag_sums[n].reshape(-1) / n_total for n in fallback]) + gamma
        else:
            diagonal_index = torch.zeros(0, dtype=torch.long, device=first.device)
            diagonal = torch.zeros(0, dtype=first.dtype, device=first.device)
        seconds = time.perf_counter() - start
        return cls(blocks, diagonal_index, diagonal, dim, gamma, arguments, seconds)

    @classmethod
    def from_operator(
        cls, operator: DampedCurvature, arguments: KFACArguments | None = None
    ) -> KFAC:
        """Fit to an engine's curvature operator (its model at θˢ, data, λ and wd):
        ``CG(preconditioner=KFAC.from_operator(engine.operator))``."""
        return cls.fit(
            operator.fmodel.module,
            operator.loss,
            operator.inputs,
            operator.targets,
            damping=operator.damping,
            weight_decay=operator.weight_decay,
            arguments=arguments,
        )

    def __call__(self, v: Tensor) -> Tensor:
        """``M⁻¹ v`` for ``v`` of shape ``[d]`` or ``[d, k]``."""
        if v.shape[0] != self.dim or v.dim() not in (1, 2):
            raise ValueError(
                f"expected a vector [{self.dim}] or matrix [{self.dim}, k], got {tuple(v.shape)}"
            )
        columns = v if v.dim() == 2 else v.unsqueeze(1)
        out = torch.empty_like(columns)
        for block in self.blocks:
            s_basis, a_basis = block.s_basis.to(v.dtype), block.a_basis.to(v.dtype)
            rotated = torch.einsum("os,ojk,ja->sak", s_basis, columns[block.index], a_basis)
            rotated = rotated / block.eigenvalues.to(v.dtype).unsqueeze(-1)
            out[block.index] = torch.einsum("os,sak,ja->ojk", s_basis, rotated, a_basis)
        if self.diagonal_index.numel():
            out[self.diagonal_index] = columns[self.diagonal_index] / self.diagonal.to(
                v.dtype
            ).unsqueeze(-1)
        return out if v.dim() == 2 else out.squeeze(1)

    def to_dense(self) -> Tensor:
        """The damped approximation ``M`` itself as a dense ``[d, d]`` matrix (small models)."""
        dense = torch.zeros(
            self.dim, self.dim, dtype=self.diagonal.dtype, device=self.diagonal.device
        )
        for block in self.blocks:
            basis = torch.kron(block.s_basis, block.a_basis)
            flat = block.index.reshape(-1)
            m = basis @ torch.diag(block.eigenvalues.reshape(-1)) @ basis.T
            dense[flat.unsqueeze(1), flat.unsqueeze(0)] = m.to(dense.dtype)
        dense[self.diagonal_index, self.diagonal_index] = self.diagonal
        return dense

    def summary(self) -> dict[str, object]:
        """What was factorised: Kronecker layers, Jacobi-fallback parameter count, fit time."""
        return {
            "kronecker_layers": [b.name for b in self.blocks],
            "diagonal_parameters": int(self.diagonal_index.numel()),
            "approximation": self.arguments.approximation,
            "fit_seconds": self.seconds,
        }


def _names(module: nn.Linear) -> list[str]:
    return ["weight"] if module.bias is None else ["weight", "bias"]


def _trainable_linears(model: nn.Module, params: dict[str, Tensor]) -> list[tuple[str, nn.Linear]]:
    """Linear layers all of whose parameters are trained (others fall back to Jacobi)."""
    found = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names = [f"{prefix}.{k}" if prefix else k for k in _names(module)]
            if all(n in params for n in names):
                found.append((prefix, module))
    return found


def _zeros_square(size: int, like: Tensor) -> Tensor:
    return torch.zeros(size, size, dtype=like.dtype, device=like.device)


def _block_index(prefix: str, module: nn.Linear, offsets: dict[str, int]) -> Tensor:
    """Flat positions of ``[W | b]`` (row-major), so the block is ``S ⊗ A`` in this order."""
    key = f"{prefix}.weight" if prefix else "weight"
    out, inp = module.out_features, module.in_features
    device = module.weight.device
    index = offsets[key] + torch.arange(out * inp, device=device).reshape(out, inp)
    if module.bias is not None:
        bias_key = f"{prefix}.bias" if prefix else "bias"
        bias = offsets[bias_key] + torch.arange(out, device=device).unsqueeze(1)
        index = torch.cat([index, bias], dim=1)
    return index


def _pi_correction(a: Tensor, s: Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr S / dim S)), Martens & Grosse (2015) §6.3."""
    a_norm = float(torch.trace(a)) / len(a)
    s_norm = float(torch.trace(s)) / len(s)
    if a_norm <= 0 or s_norm <= 0:
        return 1.0
    return math.sqrt(a_norm / s_norm)


def _eigenbasis(
    a_factor: Tensor, s_factor: Tensor, gamma: float, approximation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q_S, Q_A, damped eigenvalues [out, in(+1)])`` of the K-FAC block ``S ⊗ A``;
    ``"ekfac"`` starts from the K-FAC eigenvalues and corrects them in a second pass."""
    a_eig, a_basis = torch.linalg.eigh(a_factor)
    s_eig, s_basis = torch.linalg.eigh(s_factor)
    a_eig, s_eig = a_eig.clamp_min(0), s_eig.clamp_min(0)
    if approximation == "kfac-pi":
        pi, root = _pi_correction(a_factor, s_factor), math.sqrt(gamma)
        return s_basis, a_basis, torch.outer(s_eig + pi * root, a_eig + root / pi)
    return s_basis, a_basis, torch.outer(s_eig, a_eig) + gamma


def _output_hessian_roots(loss: Loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``R`` with ``H_y = R Rᵀ`` per example, ``[B, C, C]`` (columns are the ``r_c``)."""
    flat_dim = outputs[0].numel()
    basis = torch.eye(flat_dim, dtype=outputs.dtype, device=outputs.device)

    def column(e: Tensor) -> Tensor:
        v = e.reshape(outputs.shape[1:]).expand_as(outputs)
        return loss.output_hvp(outputs, targets, v).reshape(len(outputs), -1)

    hessian = vmap(column)(basis).permute(1, 2, 0)  # [B, C, C]
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    eigval, eigvec = torch.linalg.eigh(hessian)
    return eigvec * eigval.clamp_min(0).sqrt().unsqueeze(1)


def _linear_statistics(
    model: nn.Module,
    linears: list[tuple[str, nn.Linear]],
    loss: Loss,
    x: Tensor,
    t: Tensor,
    arguments: KFACArguments,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One batch: ``H_y`` roots, augmented inputs ``ā`` and pre-activation gradients ``g_c``.

    The pre-activation gradients are the vjp of the outputs with respect to zero
    perturbations added to each Linear layer's output.
    """
    shapes: list[torch.Size] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, o: shapes.append(o.shape)) for _, m in linears
    ]
    try:
        with torch.no_grad():
            probe = model(x)
    finally:
        for h in handles:
            h.remove()
    if probe[0].numel() > arguments.max_output_dim:
        raise ValueError(
            f"K-FAC factorises the output Hessian exactly and allows at most "
            f"max_output_dim={arguments.max_output_dim} outputs per example; "
            f"this model gives {probe[0].numel()}"
        )
    zeros = [torch.zeros(s, dtype=probe.dtype, device=probe.device) for s in shapes]

    def forward(perturbations: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        seen: list[Tensor] = []

        def hook(module: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            a = inp[0]
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            seen.append(a.reshape(-1, a.shape[-1]))
            return out + perturbations[len(seen) - 1]

        handles = [m.register_forward_hook(hook) for _, m in linears]
        try:
            outputs = model(x)
        finally:
            for h in handles:
                h.remove()
        return outputs, seen

    outputs, pullback, activations = vjp(forward, zeros, has_aux=True)
    roots = _output_hessian_roots(loss, outputs.detach(), t)
    cotangents = roots.permute(2, 0, 1).reshape(roots.shape[2], *outputs.shape)
    (pre_grads,) = vmap(pullback)(cotangents)
    pre_grads = [g.detach().reshape(g.shape[0], -1, g.shape[-1]) for g in pre_grads]
    return roots, [a.detach() for a in activations], pre_grads


def _accumulate_diagonal(
    model: nn.Module,
    params: dict[str, Tensor],
    fallback: list[str],
    x: Tensor,
    roots: Tensor,
    diag_sums: dict[str, Tensor],
) -> None:
    """Add ``Σ_i Σ_c (∂(r_icᵀ y_i)/∂θ)²`` for the fallback parameters (diagonal of ``Σ J Hᵀ J``)."""
    trained = {n: params[n].detach() for n in fallback}

    def projected(p: dict[str, Tensor], xi: Tensor, r: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return (out.reshape(-1) * r).sum()

    per_example: Callable[..., dict[str, Tensor]] = vmap(
        vmap(grad(projected), in_dims=(None, None, 0)), in_dims=(None, 0, 0)
    )
    grads = per_example(trained, x, roots.transpose(1, 2))
    for n in fallback:
        diag_sums[n] += grads[n].pow(2).sum(dim=(0, 1))
