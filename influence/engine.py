"""``InfluenceEngine``: the public entry point of the influence core.

For a trained model θˢ and its training set, answers (docs/engine.md, Conventions;
appendix Eqns 20, 50)

- ``scores``: ``score[q, i] = (1/N) ∇L_qᵀ (G + λI)⁻¹ ∇L_i``, the predicted change of
  test loss q when training point i is removed (positive = helpful);
- ``self_influence``: ``(1/N) ∇L_iᵀ (G + λI)⁻¹ ∇L_i`` (appendix D.3);
- ``group_influence``: the same for removing a set S whose loss is ``Σ_{i∈S} L_i``.

After every solve ``engine.last_report`` holds its :class:`SolverReport` (for
``self_influence``, one report aggregated over all its solves).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from influence.compiled import CompiledDirectional
from influence.errors import ConvergenceWarning
from influence.functional import (
    CurvatureKind,
    FlatModel,
    batch_product,
    batch_slices,
    per_example_directional,
    per_example_grads,
    summed_grad,
)
from influence.operators import DampedCurvature
from influence.scoring import ScoreResult, ScoringMethod, stream_scores
from influence.solvers import (
    Solver,
    SolverReport,
    merge_reports,
    phase_progress,
    relative_residuals,
)
from models.datasets import Dataset, first_outside
from models.losses import Loss, TargetError, get_loss
from models.precision import ieee_float32
from models.training import Progress, resolve_device

__all__ = ["InfluenceEngine"]

_RESIDUAL_SAMPLE = 64
"""Columns on which ``self_influence`` measures a factorizing solver's residual."""

_PROBE_EXAMPLES = 2
"""Training examples the construction-time probe runs the model's transforms on."""

_MIN_BITS = 32
"""Narrowest floating dtype the engine computes in: solves and curvature in half precision
(float16, bfloat16, float8) lose most digits, yet CG and Exact would still report success."""

_TORCH_ERRORS = (RuntimeError, IndexError, TypeError, ValueError)
"""What torch raises for a model/input mismatch or an unsupported transform
(NotImplementedError is a RuntimeError)."""

_SINGLE_EXAMPLE_HINT = "pass a single example as a batch of one, e.g. (X[:1], y[:1])"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compute_dtype(requested: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The engine's computation dtype: ``requested``, else the model's, with half types
    (fewer than 32 bits) upcast to float32 by default and refused when asked for."""
    if requested is None:
        if model_dtype.is_floating_point and torch.finfo(model_dtype).bits < _MIN_BITS:
            return torch.float32
        return model_dtype
    if not isinstance(requested, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float64, got {requested!r}")
    if requested.is_floating_point and torch.finfo(requested).bits < _MIN_BITS:
        raise ValueError(
            f"dtype {_dtype_name(requested)} is too coarse for influence: solves and curvature "
            "need at least float32 (a half-precision model is computed in float32 by default); "
            "pass dtype=torch.float32 or torch.float64"
        )
    return requested


def _as_pair(
    data: Any,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    batch_dims: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from a 2-tuple or a Dataset-like object (``.inputs``/``.targets``).

    ``batch_dims``: the training set's (inputs, targets) ranks; a pair one rank short in
    both is a single example without its batch dimension (ValueError saying so)."""
    if hasattr(data, "inputs") and hasattr(data, "targets"):
        inputs, targets = data.inputs, data.targets
    elif isinstance(data, Sequence) and len(data) == 2:
        inputs, targets = data
    else:
        raise ValueError(f"{name} must be an (inputs, targets) pair or a Dataset")
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
        raise ValueError(f"{name}: inputs and targets must be torch Tensors")
    if inputs.dim() == 0 or targets.dim() == 0:
        raise ValueError(
            f"{name}: inputs and targets need a leading batch dimension, got shapes "
            f"{list(inputs.shape)} and {list(targets.shape)}; {_SINGLE_EXAMPLE_HINT}"
        )
    if batch_dims is not None and (inputs.dim() + 1, targets.dim() + 1) == batch_dims:
        raise ValueError(
            f"{name}: inputs of shape {list(inputs.shape)} and targets of shape "
            f"{list(targets.shape)} look like one example without its batch dimension (the "
            f"training set's have {batch_dims[0]} and {batch_dims[1]} dimensions); "
            f"{_SINGLE_EXAMPLE_HINT}"
        )
    if len(inputs) == 0 or len(inputs) != len(targets):
        raise ValueError(
            f"{name}: need as many targets as inputs (> 0), got {len(inputs)} inputs "
            f"and {len(targets)} targets"
        )
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
        if not torch.isfinite(inputs).all():
            raise ValueError(f"{name}: inputs contain NaN or infinite values")
    if targets.is_floating_point():
        targets = targets.to(dtype)
        if not torch.isfinite(targets).all():
            raise ValueError(f"{name}: targets contain NaN or infinite values")
    return inputs.to(device), targets.to(device)


class InfluenceEngine:
    """Influence of training points on test losses for one trained model.

    Args:
        model: the trained network at θˢ (copied; the original is left untouched).
        loss: name in ``models.losses`` (``cross_entropy``, ``mse``, ``bce``) or a Loss.
        train: the training set, ``(X, y)`` or a ``models.Dataset``.
        hessian: ``"gnh"`` (Gauss-Newton, PSD, default) or ``"full"`` (may be indefinite).
        damping: λ in ``G + λI``.
        weight_decay: wd of the training cost ``(wd/2)‖θ‖²``; adds ``wd·I`` to G.
        batch_size: examples per vectorised pass (memory vs speed).
        device: where to compute (default: the model's device); ``"cuda"`` without a usable
            GPU is a ValueError.
        dtype: computation dtype (default: the model's, except that a float16/bfloat16
            model is computed in float32 on an upcast copy; float64 for exact checks).
            Dtypes narrower than float32 are refused (ValueError).
        compile_scoring: run JVP scoring through ``torch.compile`` (``influence.compiled``):
            the first scoring call compiles (seconds), later ones are up to ~14% faster.
            Worth it for large training sets scored many times; falls back to eager,
            with a warning, where compiling fails.

    Construction probes the model on the first two training examples (forward, loss,
    ``torch.func.jvp``, ``vmap(grad)`` and one curvature product) and turns a failure into
    a ValueError saying which step failed (docs/engine.md, Model requirements). Test
    points are checked the same way (a forward pass and the loss on two of them).

    Attributes:
        last_report: the :class:`SolverReport` of the latest ``s_test``, ``scores``,
            ``group_influence`` or ``self_influence`` call (None before any solve).
        compiled_scoring: the :class:`CompiledDirectional` (its ``status`` and
            ``compile_seconds``) when ``compile_scoring``, else None.
    """

    @ieee_float32()
    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss = "cross_entropy",
        *,
        train: tuple[Tensor, Tensor] | Dataset,
        hessian: CurvatureKind = "gnh",
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 512,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile_scoring: bool = False,
    ) -> None:
        if train is None:
            raise ValueError("train is required: the training set (X, y) or a Dataset")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("model has no parameters")
        self.device = (
            resolve_device(device, "device", ValueError) if device is not None else first.device
        )
        self.dtype = _compute_dtype(dtype, first.dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.loss = get_loss(loss)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval()
        self.fmodel, self.theta = FlatModel.of(self.model)
        if not torch.isfinite(self.theta).all():
            raise ValueError("model parameters contain NaN or infinite values")
        inputs, targets = _as_pair(train, "train", self.dtype, self.device)
        self.operator = DampedCurvature(
            self.fmodel, self.theta, self.loss, inputs, targets,
            kind=hessian, weight_decay=weight_decay, damping=damping, batch_size=batch_size,
        )  # fmt: skip
        self._vocabulary = self._token_vocabulary(inputs)
        self._check_tokens(inputs, "the training inputs")
        self._probe(inputs, targets)
        self.last_report: SolverReport | None = None
        self.compiled_scoring = (
            CompiledDirectional(self.fmodel, self.loss) if compile_scoring else None
        )

    @property
    def num_train(self) -> int:
        """N, the number of training examples."""
        return self.operator.num_examples

    @property
    def num_params(self) -> int:
        """d, the number of trainable parameters."""
        return self.operator.size

    def _outputs(self, inputs: Tensor, what: str) -> Tensor:
        """The model's outputs on a few examples (no graph); ValueError if it cannot take
        ``what`` (e.g. "the training inputs")."""
        try:
            with torch.no_grad():
                outputs = self.fmodel(self.theta, inputs)
        except torch.OutOfMemoryError:
            raise  # transient, not a model defect: the caller may retry
        except _TORCH_ERRORS as exc:
            train_shape = list(self.operator.inputs.shape[1:])
            raise ValueError(
                f"the model cannot take {what} (per-example shape {list(inputs.shape[1:])}, "
                f"dtype {_dtype_name(inputs.dtype)}; the training inputs have {train_shape}): "
                f"{exc}"
            ) from exc
        if not isinstance(outputs, Tensor):
            raise ValueError(
                f"the model must return one Tensor of outputs, got a {type(outputs).__name__} "
                "(e.g. nn.LSTM returns (output, state): wrap it in a module that returns logits)"
            )
        return outputs

    def _check_targets(self, outputs: Tensor, targets: Tensor, what: str) -> None:
        """Class indices lie in ``[0, C)`` for cross-entropy (all of ``targets``, before any
        loss is evaluated: on CUDA an out-of-range index is a device-side assert), binary
        cross-entropy targets in ``[0, 1]`` (outside it the loss is unbounded below), and
        the loss takes ``outputs`` and the first ``len(outputs)`` targets (one value each)."""
        if self.loss.name == "bce" and not targets.is_complex():
            found = first_outside(targets, 0, 1, closed=True)
            if found is not None:
                raise ValueError(
                    f"bce targets must lie in [0, 1] (0/1 labels or probabilities): {what} "
                    f"example {found[0]} has {found[1]:g} (for -1/+1 labels pass (t + 1) / 2)"
                )
        integer = not (targets.is_floating_point() or targets.is_complex())
        if self.loss.name == "cross_entropy" and integer:  # float targets: the loss says so
            classes = outputs.shape[-1]
            found = first_outside(targets, 0, classes)
            if found is not None:
                raise ValueError(
                    f"cross_entropy targets must be integer class indices [0, {classes}) (the "
                    f"model gives {classes} logits): {what} example {found[0]} has {found[1]}"
                )
        try:
            with torch.no_grad():
                values = self.loss.per_example(outputs, targets[: len(outputs)])
        except TargetError as exc:  # already says what is wrong; say which targets
            raise ValueError(f"{what}: {exc}") from exc
        except torch.OutOfMemoryError:
            raise  # transient, not a model defect: the caller may retry
        except _TORCH_ERRORS as exc:
            raise ValueError(
                f"the {self.loss.name} loss cannot take the model's outputs (per-example shape "
                f"{list(outputs.shape[1:])}) and {what} (per-example shape "
                f"{list(targets.shape[1:])}, dtype {_dtype_name(targets.dtype)}): {exc}"
            ) from exc
        if values.shape != (len(outputs),):
            raise ValueError(
                f"the {self.loss.name} loss of the model's outputs and {what} has shape "
                f"{list(values.shape)}, expected one value per example ({len(outputs)})"
            )

    def _token_vocabulary(self, inputs: Tensor) -> int | None:
        """Rows of the ``nn.Embedding`` that takes the model's integer inputs as they are
        (a token embedding), found on a forward pass over one all-zero example shaped like
        ``inputs`` (id 0 is in every vocabulary); None if none does, or if the model cannot
        take such inputs at all (the construction probe then says why)."""
        if inputs.is_floating_point():
            return None
        inputs = torch.zeros_like(inputs[:1])
        rows: list[int] = []

        def seen(module: nn.Embedding, args: tuple[Any, ...]) -> None:
            if args and args[0] is inputs:
                rows.append(module.num_embeddings)

        hooks = [
            m.register_forward_pre_hook(seen)
            for m in self.model.modules()
            if isinstance(m, nn.Embedding)
        ]
        try:
            with torch.no_grad():
                self.fmodel(self.theta, inputs)
        except torch.OutOfMemoryError:
            raise  # transient, not a model defect: the caller may retry
        except _TORCH_ERRORS:
            return None
        finally:
            for hook in hooks:
                hook.remove()
        return min(rows) if rows else None

    def _check_tokens(self, inputs: Tensor, what: str) -> None:
        """Token ids lie in ``[0, V)`` for every example (an id outside it is an IndexError
        on the CPU but a device-side assert on CUDA, which breaks the whole process)."""
        vocabulary = self._vocabulary
        if vocabulary is None or inputs.is_floating_point():
            return
        found = first_outside(inputs, 0, vocabulary)
        if found is not None:
            raise ValueError(
                f"token ids must lie in [0, {vocabulary}) (the model's token embedding has "
                f"{vocabulary} rows): {what} example {found[0]} has {found[1]}"
            )

    def _probe(self, inputs: Tensor, targets: Tensor) -> None:
        """Run every transform the engine relies on, on the first ``_PROBE_EXAMPLES``
        training examples, so an unsupported model fails here with a ValueError naming the
        step instead of deep inside a solve."""
        x, t = inputs[:_PROBE_EXAMPLES], targets[:_PROBE_EXAMPLES]
        outputs = self._outputs(x, "the training inputs")
        self._check_targets(outputs, targets, "the training targets")
        fmodel, loss, theta = self.fmodel, self.loss, self.theta
        direction = torch.ones_like(theta).unsqueeze(0)
        kind = self.operator.kind
        steps = (
            (
                "forward-mode autodiff (torch.func.jvp), which the Gauss-Newton products and "
                "JVP scoring need",
                lambda: per_example_directional(fmodel, loss, theta, x, t, direction),
            ),
            (
                "per-example gradients (torch.func.vmap over torch.func.grad), which test "
                "gradients, self-influence and 'grad' scoring need",
                lambda: per_example_grads(fmodel, loss, theta, x, t),
            ),
            (
                "the Gauss-Newton product (torch.func.jvp, then vjp)"
                if kind == "gnh"
                else "the Hessian product (forward-over-reverse: torch.func.jvp of grad)",
                lambda: batch_product(kind, fmodel, loss)(theta, x, t, direction[0]),
            ),
        )
        for needed, run in steps:
            try:
                run()
            except torch.OutOfMemoryError:
                raise  # transient, not a model defect: the caller may retry
            except _TORCH_ERRORS as exc:
                raise ValueError(
                    f"the model does not support {needed}: {exc} (see docs/engine.md, Model "
                    "requirements)"
                ) from exc

    def _pair(self, data: Any, name: str, noun: str | None = None) -> tuple[Tensor, Tensor]:
        """``data`` as (inputs, targets) in the engine's dtype and device, checked against
        the model: a forward pass and the loss on a few of them, class-index ranges, and
        a hint when a single example was passed without its batch dimension. Messages call
        them ``noun`` (default "the {name}") inputs/targets."""
        noun = noun or f"the {name}"
        ranks = (self.operator.inputs.dim(), self.operator.targets.dim())
        x, t = _as_pair(data, name, self.dtype, self.device, ranks)
        self._check_tokens(x, f"{noun} inputs")
        outputs = self._outputs(x[:_PROBE_EXAMPLES], f"{noun} inputs")
        self._check_targets(outputs, t, f"{noun} targets")
        return x, t

    def _gradients(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.cat(
            [
                per_example_grads(self.fmodel, self.loss, self.theta, x[sl], t[sl])
                for sl in batch_slices(len(x), self.operator.batch_size)
            ]
        )

    @ieee_float32()
    def gradients(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example loss gradients ``∇_θ L(f(θˢ, x_j), t_j)``, shape ``[k, d]``."""
        return self._gradients(*self._pair((inputs, targets), "gradients", "the gradients()"))

    @ieee_float32()
    def s_test(
        self, test: Any, solver: Solver, progress: Progress | None = None
    ) -> tuple[Tensor, SolverReport]:
        """``s_q = (G + λI)⁻¹ ∇L_q`` for k test points in one k-column solve (Eqn 50);
        returns ``([k, d], report)``."""
        _require_solver(solver)
        grads = self._gradients(*self._pair(test, "test"))
        solution, report = solver.solve(self.operator, grads.T, progress)
        self.last_report = report
        return solution.T.contiguous(), report

    @ieee_float32()
    def scores_from_s_test(
        self,
        s_test: Tensor,
        start: int = 0,
        stop: int | None = None,
        method: ScoringMethod = "auto",
        progress: Progress | None = None,
    ) -> Tensor:
        """``(1/N) ∇L_i · s_q`` for training points ``start ≤ i < stop``, shape ``[k, stop−start]``
        (one shard of the score matrix; N is always the full training-set size)."""
        stop = self.num_train if stop is None else stop
        if not 0 <= start < stop <= self.num_train:
            raise ValueError(
                f"shard [start, stop) = [{start}, {stop}) must lie within [0, {self.num_train}]"
            )
        if s_test.dim() != 2 or s_test.shape[1] != self.num_params:
            raise ValueError(
                f"s_test must have shape [k, {self.num_params}], got {tuple(s_test.shape)}"
            )
        op = self.operator
        return stream_scores(
            self.fmodel, self.loss, self.theta, op.inputs[start:stop], op.targets[start:stop],
            s_test.to(self.device, self.dtype), num_train=self.num_train,
            batch_size=op.batch_size, method=method, progress=progress,
            compiled=self.compiled_scoring,
        )  # fmt: skip

    @ieee_float32()
    def scores(
        self,
        test: Any,
        solver: Solver,
        progress: Progress | None = None,
        method: ScoringMethod = "auto",
    ) -> ScoreResult:
        """Scores ``[k, N]`` of every training point for k test points (Eqns 20, 50).

        ``method`` picks the scoring path (``"jvp"``, ``"grad"``, or ``"auto"``: JVP for
        k ≤ ``influence.scoring.JVP_MAX_DIRECTIONS``).
        """
        s_test, report = self.s_test(test, solver, phase_progress(progress, 0.0, 0.5))
        scores = self.scores_from_s_test(
            s_test, method=method, progress=phase_progress(progress, 0.5, 1.0)
        )
        return ScoreResult(scores=scores, s_test=s_test, report=report)

    @ieee_float32()
    def self_influence(self, solver: Solver, progress: Progress | None = None) -> Tensor:
        """``(1/N) ∇L_iᵀ (G + λI)⁻¹ ∇L_i`` for every training point, shape ``[N]``.

        Solvers that factorize (``Exact``, ``Lanczos``) factor once and evaluate the
        quadratic forms in chunks; the others solve one chunk of ``batch_size`` gradients
        at a time (LiSSA estimates its scale σ once, not per chunk).

        ``self.last_report`` then holds one report for the whole call: the largest
        relative residual (for a factorization, measured on the first
        ``_RESIDUAL_SAMPLE`` gradients), ``converged`` only if every chunk converged,
        the largest per-chunk iteration count, and the total seconds. Unconverged chunks
        give one ``ConvergenceWarning`` for the call, not one per chunk.
        """
        _require_solver(solver)
        started = time.perf_counter()
        op = self.operator
        factorizes = hasattr(solver, "factorize")
        inverse = solver.factorize(op, phase_progress(progress, 0.0, 0.5)) if factorizes else None
        if hasattr(solver, "calibrated"):
            solver = solver.calibrated(op)
        progress = phase_progress(progress, 0.5 if factorizes else 0.0, 1.0)
        out = torch.empty(self.num_train, dtype=self.dtype, device=self.device)
        n = self.num_train
        reports: list[SolverReport] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for sl in batch_slices(n, op.batch_size):
                grads = per_example_grads(self.fmodel, self.loss, self.theta, *_rows(op, sl)).T
                if inverse is not None:
                    out[sl] = inverse.quadratic(grads)
                else:
                    chunk = phase_progress(progress, sl.start / n, sl.stop / n)
                    solution, chunk_report = solver.solve(op, grads, chunk)
                    out[sl] = (grads * solution).sum(dim=0)
                    reports.append(chunk_report)
                if progress is not None:
                    progress(sl.stop / n, "self_influence")
        if inverse is not None:
            sample = self._gradients(*_rows(op, slice(0, _RESIDUAL_SAMPLE))).T
            residual = relative_residuals(op, inverse.solve(sample), sample)
            report = SolverReport(
                method=type(solver).__name__.lower(),
                iterations=inverse.iterations,
                seconds=time.perf_counter() - started,
                relative_residual=float(residual.max()),
                converged=True,
                details={
                    "factorization": type(inverse).__name__,
                    "residual_columns": len(residual),
                },
            )
        else:
            report = merge_reports(reports, time.perf_counter() - started)
        self.last_report = report
        if not report.converged:
            failed = report.details["solve_converged"].count(False)
            warnings.warn(
                f"self_influence: {failed} of {len(reports)} chunk solves did not converge "
                f"(largest relative residual {report.relative_residual:.3g}); see "
                "engine.last_report",
                ConvergenceWarning,
                stacklevel=2,
            )
        return out / self.num_train

    @ieee_float32()
    def group_influence(
        self, indices: Sequence[int] | Tensor, test: Any, solver: Solver
    ) -> tuple[Tensor, SolverReport]:
        """Predicted change of each test loss when the set S = ``indices`` is removed,
        S's loss being ``Σ_{i∈S} L_i`` with ε = 1/N: ``(1/N) ∇L_qᵀ (G+λI)⁻¹ Σ_{i∈S} ∇L_i``.
        Returns ``([k], report)``; one solve whatever k."""
        _require_solver(solver)
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() == 0:
            raise ValueError("indices must name at least one training point")
        if int(index.min()) < 0 or int(index.max()) >= self.num_train:
            raise ValueError(f"indices must lie in [0, {self.num_train}), got {index.tolist()}")
        if index.unique().numel() != index.numel():
            raise ValueError("indices must not repeat: a group is a set of training points")
        x, t = self._pair(test, "test")
        op = self.operator
        index = index.to(self.device)
        group_grad = sum(
            summed_grad(self.fmodel, self.loss, self.theta, *_rows(op, index[sl]))
            for sl in batch_slices(len(index), op.batch_size)
        )
        solution, report = solver.solve(op, group_grad)
        self.last_report = report
        return self._gradients(x, t) @ solution / self.num_train, report


def _require_solver(solver: Any) -> None:
    """TypeError unless ``solver`` is a solver instance (not its class)."""
    if isinstance(solver, type):
        raise TypeError(
            f"solver must be an instance, e.g. {solver.__name__}(), not the class {solver.__name__}"
        )
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(
            "solver must be an instance such as Exact(), CG(), LiSSA() or Lanczos(), got "
            f"{type(solver).__name__}"
        )


def _rows(op: DampedCurvature, index: slice | Tensor) -> tuple[Tensor, Tensor]:
    return op.inputs[index], op.targets[index]
