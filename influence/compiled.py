"""Scoring's forward-mode pass through ``torch.compile`` (opt-in: ``compile_scoring``).

Eager ``torch.func.jvp`` pays for every primal and tangent op separately, and its forward
rule for a matrix product also multiplies the *zero* tangent of the network's input by
the first layer's weights (``addmm``'s rule is ``self_t + mat1_t @ mat2 + mat1 @ mat2_t``
whatever is zero). On the 301k-parameter reference MLP that makes scoring 3.3–3.6× one
plain forward pass, when the multiply-adds that are needed come to 2.89×.

``torch.compile`` (Inductor) fuses the elementwise work between the matrix products, and
``JvpProducts`` removes the products with a constant-zero operand from its graph and
lets the additions of biases and tangent terms fuse too.
Compiling costs seconds on the first call of each shape, so it pays off for large
training sets scored many times (a long-lived worker), not for one small query.
"""

from __future__ import annotations

import itertools
import math
import time
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from influence.functional import (
    BatchDirectional,
    FlatModel,
    batch_directional,
    batch_slices,
    per_example_directional,
)
from models.losses import Loss

__all__ = ["CompiledDirectional", "JvpProducts"]

aten = torch.ops.aten

_ALIGN = 16  # batch rows, for vector-width-friendly matrix products
_VIEWS = (aten.expand.default, aten.view.default, aten.permute.default, aten.t.default)
# product → (index of its first matrix operand, contracted dim of it, of the second)
_CONTRACTED = {
    aten.mm.default: (0, 1, 0),
    aten.bmm.default: (0, 2, 1),
    aten.addmm.default: (1, 1, 0),
}


def _is_zero(node: object) -> bool:
    """Whether a graph node is a constant all-zero tensor (a fill of 0, or a view of one)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in _VIEWS:
        return _is_zero(node.args[0])
    if node.target == aten.full.default:
        return node.args[1] == 0
    return node.target == aten.zeros.default


class JvpProducts(CustomGraphPass):
    """Inductor post-grad pass for the matrix products of a forward-mode graph.

    1. A product (``mm``, ``bmm``, ``addmm``) with an all-zero operand, the tangent of
       the network's input, is made to contract over zero of its columns: the same
       result (zeros, or ``addmm``'s addend) with no multiply-adds and no change of shape.
       (Unlike the dense product it does not turn an ``inf`` of the other operand into
       NaN.)
    2. ``addmm(C, A, B)`` becomes ``C + A @ B``. Inductor then fuses the addition into
       the elementwise op that consumes the sum (an activation, its derivative mask),
       where ``addmm`` would first copy C into its output: a whole pass over the
       activations for every bias and every two-term tangent.

    ``zero_products`` and ``unfused`` count the rewrites of graphs compiled through this
    instance (Inductor's cache skips the pass for a graph it has compiled before).
    """

    def __init__(self) -> None:
        self.zero_products = 0
        self.unfused = 0

    def __call__(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _CONTRACTED:
                continue
            first, dim_a, dim_b = _CONTRACTED[node.target]
            a, b = node.args[first : first + 2]
            if _is_zero(a) or _is_zero(b):
                with graph.inserting_before(node):
                    a = graph.call_function(aten.slice.Tensor, (a, dim_a, 0, 0))
                    b = graph.call_function(aten.slice.Tensor, (b, dim_b, 0, 0))
                node.args = (*node.args[:first], a, b, *node.args[first + 2 :])
                self.zero_products += 1
            if node.target == aten.addmm.default and not node.kwargs:
                with graph.inserting_before(node):
                    product = graph.call_function(aten.mm.default, (a, b))
                    total = graph.call_function(aten.add.Tensor, (node.args[0], product))
                product.meta["val"] = node.meta.get("val")
                total.meta.update(node.meta)
                node.replace_all_uses_with(total)
                graph.erase_node(node)
                self.unfused += 1
        graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _own_code(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompilations against its limit, per code object: each ``CompiledDirectional`` gets
    its own cache, freed with it, instead of sharing one that a long-lived worker with
    many models would fill (after which Dynamo silently runs eager)."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledDirectional:
    """``[∇_θ L_i · s_j]_{j,i}`` like ``functional.per_example_directional``, batch by
    batch through one ``torch.compile``d forward-mode pass (``batch_directional``,
    whole-graph: ``fullgraph=True``).

    Shapes are static and few, since each compiles once: the examples go in equal,
    contiguous batches of at most ``batch_size`` rows (a multiple of 16 where that fits;
    the last batch padded), the directions in groups of 4, then 2, then 1 (k = 7: 4, 2,
    1). The first batch of each new shape is compiled (seconds; ``compile_seconds`` is
    the first compiling call) and checked against the eager pass, to ``√eps`` of the
    dtype. If compiling fails (no C++ compiler, an op Dynamo cannot trace whole) or a
    check fails, a ``RuntimeWarning`` says why and every later call is eager; a shape
    beyond Dynamo's recompile limit runs eagerly, with a warning, and the compiled
    shapes stay compiled. ``status`` is ``"pending"`` (not yet called), ``"compiled"``
    or ``"eager: <reason>"``; ``graph_pass`` is the :class:`JvpProducts` used (None with
    ``graph_pass=False``: ``torch.compile`` alone, the benchmark's ablation).
    """

    def __init__(self, fmodel: FlatModel, loss: Loss, *, graph_pass: bool = True) -> None:
        self.fmodel, self.loss = fmodel, loss
        self.graph_pass = JvpProducts() if graph_pass else None
        self._eager: BatchDirectional = batch_directional(fmodel, loss)
        self._compiled = torch.compile(
            _own_code(self._eager),
            fullgraph=True,
            dynamic=False,
            options={"post_grad_custom_post_pass": self.graph_pass} if graph_pass else None,
        )
        self.status = "pending"
        self.compile_seconds: float | None = None
        self._compiled_shapes: set[tuple] = set()
        self._eager_shapes: set[tuple] = set()

    def __call__(
        self,
        theta: Tensor,
        inputs: Tensor,
        targets: Tensor,
        directions: Tensor,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Shape ``[k, n]`` for ``directions[k, d]`` and n examples in chunks of
        ``batch_size``; ``on_batch`` gets the end index of each finished chunk."""
        n, k = len(inputs), directions.shape[0]
        rows = _batch_rows(n, batch_size)
        out = directions.new_empty(k, n)
        done = 0
        with torch.no_grad():
            for sl in batch_slices(n, rows):
                if self.status.startswith("eager"):
                    break
                x = _padded(inputs[sl], rows).contiguous()
                t = _padded(targets[sl], rows).contiguous()
                for group in _direction_groups(k):
                    values = self._batch(theta, directions[group].contiguous(), x, t)
                    out[group, sl] = values[:, : sl.stop - sl.start]
                done = sl.stop
                if on_batch is not None:
                    on_batch(done)
        if done < n:  # compiling failed: the rest eagerly
            out[:, done:] = per_example_directional(
                self.fmodel, self.loss, theta, inputs[done:], targets[done:], directions,
                batch_size, None if on_batch is None else lambda i: on_batch(done + i),
            )  # fmt: skip
        return out

    def _batch(self, *args: Tensor) -> Tensor:
        shape = tuple((a.shape, a.dtype, a.device) for a in args)
        if self.status.startswith("eager") or shape in self._eager_shapes:
            return self._eager(*args)
        new = shape not in self._compiled_shapes
        if new and len(self._compiled_shapes) >= torch._dynamo.config.recompile_limit:
            # Dynamo would run it eagerly, unannounced; say so, and keep the others.
            self._eager_shapes.add(shape)
            self._warn(f"more than {len(self._compiled_shapes)} input shapes; this one")
            return self._eager(*args)
        started = time.perf_counter()
        try:
            result = self._compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # whatever cannot be compiled stays eager
            self.status = f"eager: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            self._warn("from now on")
            return self._eager(*args)
        if new:
            self._compiled_shapes.add(shape)
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - started
            expected = self._eager(*args)
            error = float((result - expected).norm() / expected.norm().clamp_min(1e-30))
            if not error <= torch.finfo(expected.dtype).eps ** 0.5:
                self.status = f"eager: compiled pass differs from eager by {error:.1e} (relative)"
                self._warn("from now on")
                return expected
            self.status = "compiled"
        return result

    def _warn(self, what: str) -> None:
        reason = "" if self.status in ("pending", "compiled") else f" ({self.status[7:]})"
        # stack: _warn, _batch, __call__, stream_scores, scores_from_s_test, its caller
        warnings.warn(f"compiled scoring: {what} scoring eagerly{reason}",
                      RuntimeWarning, stacklevel=6)  # fmt: skip


def _direction_groups(k: int) -> list[slice]:
    """Row slices of k directions: groups of 4, then one of 2, then one of 1."""
    sizes = [4] * (k // 4) + [2] * (k % 4 // 2) + [1] * (k % 2)
    starts = itertools.accumulate(sizes, initial=0)
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=False)]


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows per batch: n split evenly into the fewest batches of ≤ ``batch_size``, rounded
    up to a multiple of ``_ALIGN`` where that stays ≤ ``batch_size``."""
    even = math.ceil(n / max(1, math.ceil(n / batch_size)))
    return max(1, min(batch_size, _ALIGN * math.ceil(even / _ALIGN)))


def _padded(rows: Tensor, size: int) -> Tensor:
    """``rows`` extended to ``size`` rows with copies of its first row."""
    missing = size - len(rows)
    if missing <= 0:
        return rows
    return torch.cat([rows, rows[:1].expand(missing, *rows.shape[1:])])
