"""Scoring's forward-mode pass through ``torch.compile`` (opt-in: ``compile_scoring``).

Eager ``torch.func.jvp`` pays for every primal and tangent op separately, and its forward
rule for a matrix product also multiplies the *zero* tangent of the network's input by
the first layer's weights (``addmm``'s rule is ``self_t + mat1_t @ mat2 + mat1 @ mat2_t``
whatever is zero). On the 301k-parameter reference MLP that makes scoring 3.3–3.5× one
plain forward pass, when the multiply-adds that are needed come to 2.89×.

``torch.compile`` (Inductor) fuses the elementwise work between the matrix products, and
``JvpProducts`` removes the products with a constant-zero operand from its graph and
lets the additions of biases and tangent terms fuse too.
Compiling costs seconds on the first call of each shape, so it pays off for large
training sets scored many times (a long-lived worker), not for one small query.
"""

from __future__ import annotations

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
_CHECK_RTOL = 1e-4  # compiled vs eager on the first batch; float32 sums are reordered
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
    2. ``addmm(C, A, B)`` becomes ``C + A @ B``. Inductor then fuses the addition into
       the elementwise op that consumes the sum (an activation, its derivative mask),
       where ``addmm`` would first copy C into its output: a whole pass over the
       activations for every bias and every two-term tangent.
    """

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
            if node.target == aten.addmm.default and not node.kwargs:
                with graph.inserting_before(node):
                    product = graph.call_function(aten.mm.default, (a, b))
                    total = graph.call_function(aten.add.Tensor, (node.args[0], product))
                product.meta["val"] = node.meta.get("val")
                total.meta.update(node.meta)
                node.replace_all_uses_with(total)
                graph.erase_node(node)
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
    batch through one ``torch.compile``d forward-mode pass (``batch_directional``).

    Shapes are static and few, so that each compiles once: the examples go in equal
    batches of at most ``batch_size`` rows (a multiple of 16 where that fits; the last
    batch padded), the directions one at a time when k = 1, else in groups of
    ``DIRECTION_GROUP`` (padded with zero directions). The first call compiles (seconds;
    ``compile_seconds``) and is checked against the eager pass. If compiling fails (no
    C++ compiler, an op Dynamo cannot trace, more shapes than Dynamo's recompile limit)
    or the two disagree, a ``RuntimeWarning`` says why and every later call is eager.
    ``status`` is ``"pending"`` (not yet called), ``"compiled"`` or ``"eager: <reason>"``.
    """

    DIRECTION_GROUP = 4

    def __init__(self, fmodel: FlatModel, loss: Loss) -> None:
        self.fmodel, self.loss = fmodel, loss
        self._eager: BatchDirectional = batch_directional(fmodel, loss)
        self._compiled = torch.compile(
            _own_code(self._eager),
            dynamic=False,
            options={"post_grad_custom_post_pass": JvpProducts()},
        )
        self.status = "pending"
        self.compile_seconds: float | None = None
        self._shapes: set[tuple] = set()

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
        group = 1 if k == 1 else self.DIRECTION_GROUP
        rows = _batch_rows(n, batch_size)
        out = directions.new_empty(k, n)
        done = 0
        with torch.no_grad():
            for sl in batch_slices(n, rows):
                if self.status.startswith("eager"):
                    break
                x, t = _padded(inputs[sl], rows), _padded(targets[sl], rows)
                for lo in range(0, k, group):
                    some = directions[lo : lo + group]
                    values = self._batch(theta, _padded(some, group, zeros=True), x, t)
                    out[lo : lo + len(some), sl] = values[: len(some), : sl.stop - sl.start]
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
        if shape not in self._shapes and not self.status.startswith("eager"):
            # Past its recompile limit Dynamo would run this code eagerly, unannounced.
            if len(self._shapes) >= torch._dynamo.config.recompile_limit:
                self._fall_back(f"more than {len(self._shapes)} input shapes")
            self._shapes.add(shape)
        if self.status.startswith("eager"):
            return self._eager(*args)
        started = time.perf_counter()
        try:
            result = self._compiled(*args)
        except Exception as error:  # whatever cannot be compiled stays eager
            self._fall_back(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            return self._eager(*args)
        if self.status == "pending":
            self.compile_seconds = time.perf_counter() - started
            expected = self._eager(*args)
            error = float((result - expected).norm() / expected.norm().clamp_min(1e-30))
            if not error <= _CHECK_RTOL:
                self._fall_back(f"compiled pass differs from eager by {error:.1e} (relative)")
                return expected
            self.status = "compiled"
        return result

    def _fall_back(self, reason: str) -> None:
        self.status = f"eager: {reason}"
        warnings.warn(f"compiled scoring unavailable, scoring eagerly ({reason})",
                      RuntimeWarning, stacklevel=4)  # fmt: skip


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows per batch: n split evenly into the fewest batches of ≤ ``batch_size``, rounded
    up to a multiple of ``_ALIGN`` where that stays ≤ ``batch_size``."""
    even = math.ceil(n / max(1, math.ceil(n / batch_size)))
    return max(1, min(batch_size, _ALIGN * math.ceil(even / _ALIGN)))


def _padded(rows: Tensor, size: int, zeros: bool = False) -> Tensor:
    """``rows`` extended to ``size`` rows with zeros or copies of its first row."""
    missing = size - len(rows)
    if missing <= 0:
        return rows
    filler = (
        rows.new_zeros(missing, *rows.shape[1:])
        if zeros
        else rows[:1].expand(missing, *rows.shape[1:])
    )
    return torch.cat([rows, filler])
