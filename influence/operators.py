"""The damped curvature ``G + λI`` as a linear operator on flat parameter vectors.

``G = (1/N) Σ_i J_iᵀ H_i J_i + wd·I`` (Gauss-Newton, the default) or the Hessian of the
cost ``J(θ) = (1/N) Σ_i L_i + (wd/2)‖θ‖²`` (docs/engine.md, Conventions); the solvers
see only ``matvec``/``matmat`` on the full training set, ``curvature`` on a minibatch,
and, for small d, ``dense``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from influence.functional import CurvatureKind, FlatModel, batch_product, dataset_product
from models.losses import Loss
from models.training import Progress

__all__ = ["DampedCurvature", "ReplayedCurvature"]

_DENSE_BLOCK = 128  # columns of the identity pushed through one vmapped pass by dense()
_REPLAY_RTOL = 1e-5  # a traced product's replay vs the eager product, relative (float32 ops)


class DampedCurvature:
    """``A = G + λI`` at θ on a training set (inputs, targets), applied without forming it.

    Vectors are ``[d]`` or ``[d, k]`` (k columns in one vmapped pass per data chunk).

    Args:
        fmodel, theta: the network as a function of flat parameters, and θ (``[d]``).
        loss: the per-example loss.
        inputs, targets: the training set (N examples, on θ's device).
        kind: ``"gnh"`` (Gauss-Newton, PSD) or ``"full"`` (Hessian, may be indefinite).
        weight_decay: wd of ``(wd/2)‖θ‖²``; adds ``wd·I`` to G.
        damping: λ.
        batch_size: examples per vectorised pass.
    """

    def __init__(
        self,
        fmodel: FlatModel,
        theta: Tensor,
        loss: Loss,
        inputs: Tensor,
        targets: Tensor,
        *,
        kind: CurvatureKind = "gnh",
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        batch_size: int = 512,
    ) -> None:
        if kind not in ("gnh", "full"):
            raise ValueError(f"hessian must be 'gnh' or 'full', got {kind!r}")
        for name, value in (("weight_decay", weight_decay), ("damping", damping)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(
                f"training set needs as many targets as inputs (> 0): "
                f"{len(inputs)} inputs, {len(targets)} targets"
            )
        self.fmodel = fmodel
        self.theta = theta
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        self.kind: CurvatureKind = kind
        self.weight_decay = float(weight_decay)
        self.damping = float(damping)
        self.batch_size = batch_size
        self._dense: Tensor | None = None
        self._replayed: ReplayedCurvature | None = None

    @property
    def size(self) -> int:
        """d, the number of parameters."""
        return self.theta.numel()

    @property
    def num_examples(self) -> int:
        """N, the number of training examples."""
        return len(self.inputs)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of θ and of every product."""
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        """Device of θ, the training set and every product."""
        return self.theta.device

    def curvature(self, vectors: Tensor, indices: Tensor | None = None) -> Tensor:
        """``G V`` (weight decay included, damping not), on the examples ``indices``
        (a minibatch, as LiSSA uses) or on the whole training set."""
        inputs, targets = self.inputs, self.targets
        if indices is not None:
            inputs, targets = inputs[indices], targets[indices]
        product = dataset_product(
            self.kind, self.fmodel, self.loss, self.theta, inputs, targets, vectors,
            self.batch_size,
        )  # fmt: skip
        return self._complete(product, vectors)

    def _complete(self, product: Tensor, vectors: Tensor) -> Tensor:
        """The data term ``product`` (``Σ_{i∈B} C_i V / |B|``) plus the operator's other
        terms: ``wd·V`` (and, down-weighted, ``− ε Σ_z C_z V``)."""
        return product + self.weight_decay * vectors

    def downweighted(self, indices: Tensor, epsilon: float) -> DampedCurvature:
        """The curvature of the down-weighted objective ``(1/N) Σ_i L_i − ε Σ_{z} L_z``
        (appendix Eqn 5; ε = 1/N removes the examples ``indices``), which warm-start and
        proximal retraining minimise: ``G − ε Σ_z C_z`` (+ wd·I, + λI). On a minibatch it
        is ``G_B − ε Σ_z C_z``, still unbiased."""
        return _Downweighted(self, indices, epsilon)

    def replayed_curvature(self) -> ReplayedCurvature:
        """``(V, indices) ↦ G_B V`` like ``curvature``, replayed from a trace (for LiSSA);
        one per operator, so its traces serve every later solve on it."""
        if self._replayed is None:
            self._replayed = ReplayedCurvature(self)
        return self._replayed

    def matmat(self, vectors: Tensor) -> Tensor:
        """``(G + λI) V`` on the full training set; ``V`` is ``[d]`` or ``[d, k]``."""
        return self.curvature(vectors) + self.damping * vectors

    def matvec(self, vector: Tensor) -> Tensor:
        """``(G + λI) v`` for one vector ``v[d]``."""
        if vector.dim() != 1:
            raise ValueError(f"matvec takes a vector of shape [d], got {tuple(vector.shape)}")
        return self.matmat(vector)

    def dense(self, progress: Progress | None = None) -> Tensor:
        """The explicit symmetric ``d × d`` matrix ``G + λI`` (computed once, then cached);
        ``progress(fraction, "curvature")`` after each block of columns."""
        if self._dense is None:
            d = self.size
            eye = torch.eye(d, dtype=self.dtype, device=self.device)
            columns = []
            for start in range(0, d, _DENSE_BLOCK):
                columns.append(self.matmat(eye[:, start : start + _DENSE_BLOCK]))
                if progress is not None:
                    progress(min(1.0, (start + _DENSE_BLOCK) / d), "curvature")
            matrix = torch.cat(columns, dim=1)
            self._dense = (matrix + matrix.T) / 2
        return self._dense


class ReplayedCurvature:
    """``(V, indices) ↦ G_B V`` (weight decay included), as ``DampedCurvature.curvature``,
    for long loops of minibatch products of one shape (LiSSA's recursion).

    Each eager product pays ``torch.func``'s transform overhead on every op, which
    dominates on small models (a 128-example, 10-column product on a 3.5k-parameter MLP:
    about 1 ms, against 0.05 ms for one plain forward pass). Here the first call of a
    shape traces the product with ``make_fx`` into a graph of plain aten ops (a few tenths
    of a second), which later calls of that shape replay (about half the time there). The
    first replay, on a new minibatch, is checked against the eager product: a model whose
    Python control flow depends on its inputs cannot be replayed, and if the two differ
    (or tracing fails) that shape stays eager. ``status`` maps each shape seen to
    ``"traced"`` (replay not yet checked), ``"replayed"`` or ``"eager"``; ``last`` is the
    status of the latest call's shape.
    """

    def __init__(self, operator: DampedCurvature) -> None:
        self.operator = operator
        self.status: dict[tuple, str] = {}
        self.last: str | None = None
        self._product = batch_product(operator.kind, operator.fmodel, operator.loss)
        self._graphs: dict[tuple, Callable[..., Tensor]] = {}

    def __call__(self, vectors: Tensor, indices: Tensor) -> Tensor:
        op = self.operator
        if len(indices) > op.batch_size:  # more than one pass: chunked, eager
            self.last = "eager"
            return op.curvature(vectors, indices)
        args = (op.theta, op.inputs[indices], op.targets[indices], vectors)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        status = self.status.get(key)
        if status is None:
            try:
                self._graphs[key] = make_fx(self._product)(*args)
                status = self.status[key] = "traced"
            except Exception:  # whatever make_fx cannot trace stays eager
                status = self.status[key] = "eager"
            # A trace is faithful for the inputs it was made on.
            total = self._graphs[key](*args) if status == "traced" else self._product(*args)
        elif status == "traced":
            total = self._product(*args)
            error = (self._graphs[key](*args) - total).norm()
            faithful = bool(error <= _REPLAY_RTOL * total.norm())
            self.status[key] = "replayed" if faithful else "eager"
        elif status == "replayed":
            total = self._graphs[key](*args)
        else:
            total = self._product(*args)
        self.last = self.status[key]
        return op._complete(total / len(indices), vectors)


class _Downweighted(DampedCurvature):
    """``DampedCurvature`` minus ``ε Σ_z C_z`` (see ``DampedCurvature.downweighted``)."""

    def __init__(self, base: DampedCurvature, indices: Tensor, epsilon: float) -> None:
        super().__init__(
            base.fmodel, base.theta, base.loss, base.inputs, base.targets, kind=base.kind,
            weight_decay=base.weight_decay, damping=base.damping, batch_size=base.batch_size,
        )  # fmt: skip
        self.removed = torch.as_tensor(indices, dtype=torch.long, device=base.device).reshape(-1)
        self.epsilon = float(epsilon)

    def _complete(self, product: Tensor, vectors: Tensor) -> Tensor:
        own = dataset_product(
            self.kind, self.fmodel, self.loss, self.theta, self.inputs[self.removed],
            self.targets[self.removed], vectors, self.batch_size,
        )  # fmt: skip
        scale = self.epsilon * len(self.removed)  # own is the mean over the removed examples
        return super()._complete(product, vectors) - scale * own
