"""Per-example losses and their output-space Hessian products.

The one place per-example losses are computed (training, curvature, scoring and the
response functions all call here). Each loss ``L(y, t)`` maps a batch of network
outputs ``y`` (first dimension = examples) and targets ``t`` to a vector of per-example
losses, and provides ``H_y v`` — the Hessian of ``L`` with respect to ``y``, applied to a
batch of output-space vectors — which the Gauss-Newton product ``Jᵀ H_y J v`` needs
(docs/engine.md, Conventions).

Conventions (stated because scores depend on them):

- ``cross_entropy``: softmax over the last dimension of the logits; targets are integer
  class indices in ``[0, C)``, and floating-point targets (one-hot, probabilities) are
  refused with a ``TargetError`` (a ``ValueError``) rather than truncated to indices.
  For sequence outputs ``[B, T, V]`` with integer targets ``[B, T]`` (``transformer_lm``)
  the per-example loss is the mean over the T positions. ``H_y = diag(p) − p pᵀ`` per
  position (divided by T for sequences).
- ``mse``: ``L = ½ ‖y − t‖²`` summed over output dimensions, so ``H_y = I``.
- ``bce``: sigmoid + binary cross-entropy on logits, summed over output dimensions;
  ``H_y = diag(p (1 − p))`` with ``p = sigmoid(y)``. Targets belong in ``[0, 1]`` (outside
  it the loss is unbounded below); ``InfluenceEngine`` checks that where the data enter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "Loss", "TargetError", "get_loss"]


class TargetError(ValueError):
    """Targets a loss refuses outright (e.g. floating-point targets for cross-entropy)."""


class _LossFn(Protocol):
    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor: ...


class _OutputHvp(Protocol):
    def __call__(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor: ...


def _flat_positions(outputs: Tensor) -> int:
    """Number of positions averaged per example (1 for plain [B, C] outputs)."""
    return 1 if outputs.dim() <= 2 else int(outputs[0, ..., 0].numel())


def _require_class_indices(outputs: Tensor, targets: Tensor) -> None:
    """TargetError (a ValueError) unless ``targets`` hold integers: a check of their dtype
    only, so it also holds under ``vmap``, ``jvp`` and ``torch.compile``. Ranges depend on
    the data and are checked where the data enter (``InfluenceEngine``)."""
    if targets.is_floating_point() or targets.is_complex():
        classes = outputs.shape[-1]
        raise TargetError(
            f"cross_entropy targets must be integer class indices [0, {classes}), got "
            f"{str(targets.dtype).removeprefix('torch.')} targets (one-hot or probability "
            "targets are not supported; pass targets.argmax(-1) for one-hot labels)"
        )


def _ce_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    _require_class_indices(outputs, targets)
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets.long(), reduction="none")
    per_pos = F.cross_entropy(
        outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1).long(), reduction="none"
    )
    return per_pos.reshape(outputs.shape[0], -1).mean(dim=1)


def _ce_output_hvp(outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
    p = torch.softmax(outputs, dim=-1)
    pv = (p * v).sum(dim=-1, keepdim=True)
    return (p * v - p * pv) / _flat_positions(outputs)


def _mse_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return 0.5 * diff.pow(2).reshape(outputs.shape[0], -1).sum(dim=1)


def _mse_output_hvp(outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
    return v


def _bce_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    t = targets.reshape(outputs.shape).to(outputs.dtype)
    per = F.binary_cross_entropy_with_logits(outputs, t, reduction="none")
    return per.reshape(outputs.shape[0], -1).sum(dim=1)


def _bce_output_hvp(outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
    p = torch.sigmoid(outputs)
    return p * (1 - p) * v


@dataclass(frozen=True)
class Loss:
    """A named loss: per-example values and the output-space Hessian product."""

    name: str
    per_example: _LossFn
    _hvp: _OutputHvp

    def output_hvp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``H_y v`` for each example, ``H_y = ∇²_y L(y, t)`` at ``outputs``."""
        return self._hvp(outputs, targets, v)

    def mean(self, outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """``(1/B) Σ_i w_i L(y_i, t_i)`` (weights default to 1)."""
        per = self.per_example(outputs, targets)
        if weights is not None:
            per = per * weights.to(per.dtype)
        return per.mean()


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss("cross_entropy", _ce_per_example, _ce_output_hvp),
    "mse": Loss("mse", _mse_per_example, _mse_output_hvp),
    "bce": Loss("bce", _bce_per_example, _bce_output_hvp),
}


_TORCH_EQUIVALENTS = {
    "CrossEntropyLoss": "cross_entropy",
    "MSELoss": "mse",
    "BCEWithLogitsLoss": "bce",
}
"""torch.nn loss modules whose built-in counterpart an error message can suggest."""


def get_loss(name: str | Loss) -> Loss:
    """Look a loss up by name; an unknown name, or anything else (e.g. a ``torch.nn`` loss
    module), is a ValueError listing the valid names."""
    if isinstance(name, Loss):
        return name
    valid = ", ".join(repr(n) for n in sorted(LOSSES))
    if not isinstance(name, str):
        kind = type(name).__name__
        hint = ""
        if kind in _TORCH_EQUIVALENTS:
            hint = f" (for {kind} use {_TORCH_EQUIVALENTS[kind]!r}"
            hint += "; note mse is ½‖y − t‖² summed per example)" if kind == "MSELoss" else ")"
        raise ValueError(
            f"loss must be one of the built-in names {valid} or a models.losses.Loss (per-"
            f"example values plus the output-space Hessian product), got a {kind}{hint}"
        )
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {valid}") from None
