"""Stateless ``torch.func`` primitives on a flat parameter vector θ ∈ ℝᵈ.

A network is seen as a function ``f(θ, x)`` of one flat vector (``FlatModel``), so that
curvature products, gradients and directional derivatives are plain vector calculus.
Per-example losses and their output-space Hessians come from ``models.losses``.

Batch-level primitives (``gnh_product``, ``hessian_product``) return *sums* over the
examples of the batch; ``dataset_product`` streams a dataset through them in chunks and
divides by N, giving the mean curvature of the cost (docs/engine.md, Conventions):

- Gauss-Newton: ``(1/N) Σ_i J_iᵀ H_i J_i v`` (appendix Eqn 45), via ``jvp`` → ``H_y`` →
  ``vjp``; J is never materialised.
- Hessian: ``∇²_θ (1/N) Σ_i L_i · v`` by forward-over-reverse (``jvp`` of ``grad``).

Vectors have shape ``[d]``; several vectors are stacked as columns, ``[d, k]``, and are
pushed through one pass with ``vmap`` over the tangent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from models.losses import Loss

__all__ = [
    "BatchDirectional",
    "BatchProduct",
    "CurvatureKind",
    "FlatModel",
    "batch_directional",
    "batch_product",
    "batch_slices",
    "dataset_product",
    "gnh_product",
    "hessian_product",
    "per_example_directional",
    "per_example_grads",
    "summed_grad",
]

CurvatureKind = Literal["gnh", "full"]


@dataclass(frozen=True)
class FlatModel:
    """``module`` as a function ``f(θ, x)`` of the flat vector of its trainable parameters.

    Parameters are concatenated in ``named_parameters()`` order; parameters with
    ``requires_grad=False`` and buffers keep the module's own values.
    """

    module: nn.Module
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, module: nn.Module) -> tuple[FlatModel, Tensor]:
        """Wrap ``module``; also return its current flat parameter vector (detached)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        flat = cls(module, tuple(n for n, _ in named), tuple(p.shape for _, p in named))
        theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        return flat, theta

    @property
    def size(self) -> int:
        """d, the number of trainable parameters."""
        return sum(s.numel() for s in self.shapes)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split θ into a ``{name: tensor}`` dict for ``functional_call``."""
        chunks = theta.split([s.numel() for s in self.shapes])
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def __call__(self, theta: Tensor, inputs: Tensor) -> Tensor:
        """Network outputs ``f(θ, x)`` for a batch of inputs."""
        return functional_call(self.module, self.unflatten(theta), (inputs,))


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` elements."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _per_example_losses(
    fmodel: FlatModel, loss: Loss, inputs: Tensor, targets: Tensor
) -> Callable[[Tensor], Tensor]:
    """θ ↦ ``[L(f(θ, x_i), t_i)]_i`` for a fixed batch."""
    return lambda theta: loss.per_example(fmodel(theta, inputs), targets)


def gnh_product(
    fmodel: FlatModel, loss: Loss, theta: Tensor, inputs: Tensor, targets: Tensor, v: Tensor
) -> Tensor:
    """``Σ_{i∈batch} J_iᵀ H_i J_i v`` for one vector ``v[d]`` (Gauss-Newton, Eqn 45)."""

    def outputs_of(p: Tensor) -> Tensor:
        return fmodel(p, inputs)

    outputs, jv = jvp(outputs_of, (theta,), (v,))
    hjv = loss.output_hvp(outputs, targets, jv)
    _, pullback = vjp(outputs_of, theta)
    return pullback(hjv)[0]


def hessian_product(
    fmodel: FlatModel, loss: Loss, theta: Tensor, inputs: Tensor, targets: Tensor, v: Tensor
) -> Tensor:
    """``∇²_θ (Σ_{i∈batch} L_i) v`` for one vector ``v[d]`` (forward-over-reverse)."""
    losses_of = _per_example_losses(fmodel, loss, inputs, targets)
    return jvp(grad(lambda p: losses_of(p).sum()), (theta,), (v,))[1]


_PRODUCTS: dict[str, Callable[..., Tensor]] = {"gnh": gnh_product, "full": hessian_product}

BatchProduct = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(θ, inputs, targets, V) ↦ Σ_{i∈batch} C_i V``, V ``[d]`` or ``[d, k]``."""

BatchDirectional = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(θ, s[k, d], inputs, targets) ↦ [∇_θ L_i · s_j]_{j,i}``, shape ``[k, B]``."""


def batch_product(kind: CurvatureKind, fmodel: FlatModel, loss: Loss) -> BatchProduct:
    """The summed curvature product of one batch (``gnh_product`` or ``hessian_product``),
    vmapped over the columns of ``V`` when it is a matrix."""
    product = _PRODUCTS[kind]
    columns = vmap(product, in_dims=(None, None, None, None, None, 1), out_dims=1)

    def apply(theta: Tensor, inputs: Tensor, targets: Tensor, vectors: Tensor) -> Tensor:
        fn = columns if vectors.dim() == 2 else product
        return fn(fmodel, loss, theta, inputs, targets, vectors)

    return apply


def dataset_product(
    kind: CurvatureKind,
    fmodel: FlatModel,
    loss: Loss,
    theta: Tensor,
    inputs: Tensor,
    targets: Tensor,
    vectors: Tensor,
    batch_size: int,
) -> Tensor:
    """Mean curvature ``(1/N) Σ_i C_i V`` over a dataset, ``C_i`` = GNH or Hessian term.

    ``vectors`` is ``[d]`` or ``[d, k]``; all k columns share each chunk's forward pass.
    """
    product = batch_product(kind, fmodel, loss)
    total = torch.zeros_like(vectors)
    for sl in batch_slices(len(inputs), batch_size):
        total += product(theta, inputs[sl], targets[sl], vectors)
    return total / len(inputs)


def per_example_grads(
    fmodel: FlatModel, loss: Loss, theta: Tensor, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``[∇_θ L_i]_i`` for a batch, shape ``[B, d]`` (``vmap`` of ``grad``)."""

    def single(p: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return loss.per_example(fmodel(p, x.unsqueeze(0)), t.unsqueeze(0))[0]

    return vmap(grad(single), in_dims=(None, 0, 0))(theta, inputs, targets)


def _each_direction(along: Callable[[Tensor], Tensor], directions: Tensor) -> Tensor:
    """``along`` applied to every row of ``directions[k, d]``, stacked ``[k, ...]``
    (``vmap`` over the tangents only when k > 1)."""
    if directions.shape[0] == 1:
        return along(directions[0]).unsqueeze(0)
    return vmap(along)(directions)


def batch_directional(fmodel: FlatModel, loss: Loss) -> BatchDirectional:
    """``(θ, s[k, d], inputs, targets) ↦ [∇_θ L_i · s_j]_{j,i}`` for one batch, shape
    ``[k, B]``: one ``jvp`` of the batch's per-example losses along each s_j. A pure
    function of tensors, so ``torch.compile`` can take it whole (``influence.compiled``)."""

    def apply(theta: Tensor, directions: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        losses_of = _per_example_losses(fmodel, loss, inputs, targets)
        return _each_direction(lambda s: jvp(losses_of, (theta,), (s,))[1], directions)

    return apply


def per_example_directional(
    fmodel: FlatModel,
    loss: Loss,
    theta: Tensor,
    inputs: Tensor,
    targets: Tensor,
    directions: Tensor,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``[∇_θ L_i · s_j]_{j,i}`` for directions ``s[k, d]``, shape ``[k, n]``.

    ONE forward-mode transform (``jvp`` of the per-example losses; ``vmap`` over the
    tangents only when k > 1) covers all n examples, which go through the network in
    chunks of ``batch_size`` (default: one chunk): the transform's set-up is paid once,
    not per chunk, and only one chunk's activations are live (under ``no_grad``, so none
    are kept for a backward pass). No per-example gradient is formed. ``on_batch`` is
    called with the end index of each chunk once it is done.
    """
    n = len(inputs)
    if n == 0:
        return directions.new_zeros(directions.shape[0], 0)
    chunks = list(batch_slices(n, batch_size or n))

    def losses_of(p: Tensor) -> Tensor:
        params = fmodel.unflatten(p)
        parts = []
        for sl in chunks:
            outputs = functional_call(fmodel.module, params, (inputs[sl],))
            parts.append(loss.per_example(outputs, targets[sl]))
            if on_batch is not None:
                on_batch(sl.stop)
        return torch.cat(parts)

    with torch.no_grad():
        return _each_direction(lambda s: jvp(losses_of, (theta,), (s,))[1], directions)


def summed_grad(
    fmodel: FlatModel, loss: Loss, theta: Tensor, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``∇_θ Σ_{i∈batch} L_i``, shape ``[d]``."""
    losses_of = _per_example_losses(fmodel, loss, inputs, targets)
    return grad(lambda p: losses_of(p).sum())(theta)
