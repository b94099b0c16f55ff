"""The damped curvature ``G + λI`` as a linear operator on flat parameter vectors.

``G = (1/N) Σ_i J_iᵀ H_i J_i + wd·I`` (Gauss-Newton, the default) or the Hessian of the
cost ``J(θ) = (1/N) Σ_i L_i + (wd/2)‖θ‖²`` (DESIGN.md, "Math conventions"); the solvers
see only ``matvec``/``matmat`` on the full training set, ``curvature`` on a minibatch,
and, for small d, ``dense``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from influence.functional import CurvatureKind, FlatModel, dataset_product
from models.losses import Loss
from models.training import Progress

__all__ = ["DampedCurvature"]

_DENSE_BLOCK = 128  # columns of the identity pushed through one vmapped pass by dense()


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
        return product + self.weight_decay * vectors

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
