"""Scoring every training point against s_test, streaming over the training set.

``score[q, i] = (1/N) ∇L_iᵀ s_q`` with ``s_q = (G + λI)⁻¹ ∇L_q`` (appendix Eqn 50), the
predicted change of test loss q when training point i is removed (docs/engine.md sign:
positive = helpful, negative = harmful). Two ways to get ``∇L_i · s_q``:

- ``"jvp"``: a forward-mode pass along each s_q gives the directional derivative of
  every per-example loss; no per-example gradient is stored. One ``jvp`` covers the
  whole shard, batch after batch, so its set-up is paid once. Cost grows with the
  number of test points k (k tangents per pass).
- ``"grad"``: per-example gradients by ``vmap(grad)``, then one matrix product with all
  k columns. Cost is independent of k but each batch holds a ``[B, d]`` gradient block.

``"auto"`` uses ``"jvp"`` for k ≤ ``JVP_MAX_DIRECTIONS`` and ``"grad"`` above. The JVP
path can run through ``torch.compile`` (``influence.compiled``; the engine's
``compile_scoring``): up to ~14% faster once compiled, seconds to compile.
Memory is flat in N: only one batch is live at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from influence.compiled import CompiledDirectional
from influence.functional import (
    FlatModel,
    batch_slices,
    per_example_directional,
    per_example_grads,
)
from influence.solvers import SolverReport
from models.losses import Loss
from models.training import Progress

__all__ = [
    "JVP_MAX_DIRECTIONS",
    "ScoreResult",
    "ScoringMethod",
    "TopK",
    "resolve_method",
    "stream_scores",
    "top_k",
]

ScoringMethod = Literal["auto", "jvp", "grad"]

JVP_MAX_DIRECTIONS = 32
"""Above this many test points ``"auto"`` switches from JVP to per-example gradients."""


@dataclass(frozen=True)
class TopK:
    """The k most helpful (largest score) and most harmful (most negative score) training
    indices per test point, shape ``[q, k]``, with their scores."""

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def top_k(scores: Tensor, k: int) -> TopK:
    """Rank ``scores[q, N]``: helpful = largest first, harmful = most negative first.

    If fewer than k scores of a sign exist, the lists continue with the other sign;
    check the returned scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [q, N], got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    best = scores.topk(k, dim=1)
    worst = scores.topk(k, dim=1, largest=False)
    return TopK(best.indices, best.values, worst.indices, worst.values)


@dataclass
class ScoreResult:
    """Scores ``[k, N]`` for k test points, their s_test vectors ``[k, d]`` and the
    solver report of the s_test solve."""

    scores: Tensor
    s_test: Tensor
    report: SolverReport

    def top_k(self, k: int) -> TopK:
        """Most helpful and most harmful training indices per test point."""
        return top_k(self.scores, k)


def resolve_method(method: ScoringMethod, num_directions: int) -> Literal["jvp", "grad"]:
    """The scoring path actually used for ``num_directions`` test points."""
    if method == "auto":
        return "jvp" if num_directions <= JVP_MAX_DIRECTIONS else "grad"
    if method not in ("jvp", "grad"):
        raise ValueError(f"method must be 'auto', 'jvp' or 'grad', got {method!r}")
    return method


def stream_scores(
    fmodel: FlatModel,
    loss: Loss,
    theta: Tensor,
    inputs: Tensor,
    targets: Tensor,
    s_test: Tensor,
    *,
    num_train: int,
    batch_size: int,
    method: ScoringMethod = "auto",
    progress: Progress | None = None,
    compiled: CompiledDirectional | None = None,
) -> Tensor:
    """``(1/num_train) [∇L_i · s_q]_{q,i}`` for the given examples, shape ``[k, n]``.

    ``s_test`` is ``[k, d]`` (d = ``theta.numel()``); ``num_train`` (> 0) is the full
    training-set size N of the ``1/N`` factor, which may exceed ``len(inputs)`` (a shard).
    ``compiled`` (for this fmodel and loss) runs the JVP path through ``torch.compile``.
    Raises ``ValueError`` for a malformed ``s_test``, ``num_train`` or ``batch_size``.
    """
    d = theta.numel()
    if s_test.dim() != 2 or s_test.shape[1] != d or s_test.shape[0] == 0:
        raise ValueError(f"s_test must have shape [k, {d}] with k >= 1, got {tuple(s_test.shape)}")
    if not (isinstance(num_train, int) and num_train > 0):
        raise ValueError(f"num_train must be an integer > 0, got {num_train!r}")
    if len(inputs) > num_train:
        raise ValueError(f"{len(inputs)} examples exceed num_train = {num_train}")
    if len(targets) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    path = resolve_method(method, s_test.shape[0])
    n = len(inputs)

    def done(stop: int) -> None:
        if progress is not None:
            progress(stop / n, "score")

    if path == "jvp" and compiled is not None:
        return compiled(theta, inputs, targets, s_test, batch_size, done) / num_train
    if path == "jvp":  # one transform over all batches: its set-up is paid once
        out = per_example_directional(
            fmodel, loss, theta, inputs, targets, s_test, batch_size=batch_size, on_batch=done
        )
        return out / num_train
    out = torch.empty(s_test.shape[0], n, dtype=s_test.dtype, device=s_test.device)
    for sl in batch_slices(n, batch_size):
        out[:, sl] = s_test @ per_example_grads(fmodel, loss, theta, inputs[sl], targets[sl]).T
        done(sl.stop)
    return out / num_train
