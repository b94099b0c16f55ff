"""Compiled JVP scoring: the graph pass on a hand-built graph and on the real scoring
graph, compiled scores against per-example gradients (MLP and CNN, k = 1 and k = 3), the
check of every new shape against eager, and the fallbacks to eager (compiling fails,
disagrees, fails partway, too many shapes)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from influence import InfluenceEngine
from influence.compiled import CompiledDirectional, JvpProducts
from tests.conftest import RTOL_F32, rel_error
from tests.influence.problems import tiny_cnn, tiny_data, tiny_mlp

aten = torch.ops.aten


def _products(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]


def test_jvp_products_pass_drops_zero_operands_and_unfuses_addmm() -> None:
    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        zero_rows = torch.zeros(()).expand(4, 3)
        return torch.addmm(b, zero_rows, w) + torch.addmm(b, x, w) + torch.mm(torch.zeros(4, 3), w)

    args = (torch.randn(4, 3), torch.randn(3, 5), torch.randn(5))
    module = make_fx(f)(*args)
    assert len(_products(module.graph)) == 3
    JvpProducts()(module.graph)
    module.recompile()
    products = _products(module.graph)
    assert all(n.target == aten.mm.default for n in products)  # addmm → add(C, mm)
    operands = [n.args for n in products]
    emptied = [pair for pair in operands if all(a.target == aten.slice.Tensor for a in pair)]
    assert len(emptied) == 2  # the two zero products now contract over 0 columns
    assert all(a.args[2:] == (0, 0) for pair in emptied for a in pair)
    assert sum(all(a.op == "placeholder" for a in pair) for pair in operands) == 1  # x @ w
    added = [n for n in module.graph.nodes if n.target == aten.add.Tensor]
    assert sum(n.args[0].name == "b_1" for n in added) == 2  # both biases, now plain adds
    torch.testing.assert_close(module(*args), f(*args))


def test_jvp_products_pass_drops_only_fills_of_zero() -> None:
    def f(x: Tensor, w: Tensor) -> Tensor:
        ones = torch.full((4, 3), 1.0)
        twos = torch.full((3, 5), 2.0).t().t()
        zeros = torch.full((4, 3), 0.0)
        return torch.mm(ones, w) + torch.mm(x, twos) + torch.mm(zeros, w)

    args = (torch.randn(4, 3), torch.randn(3, 5))
    module = make_fx(f)(*args)
    fills = [n for n in module.graph.nodes if n.target == aten.full.default]
    assert sorted(n.args[1] for n in fills) == [0.0, 1.0, 2.0]
    rewrite = JvpProducts()
    rewrite(module.graph)
    module.recompile()
    assert rewrite.zero_products == 1
    emptied = [n for n in _products(module.graph) if n.args[0].target == aten.slice.Tensor]
    assert len(emptied) == 1 and emptied[0].args[0].args[0].args[1] == 0.0
    x, w = args
    expected = w.sum(dim=0).expand(4, 5) + 2.0 * x.sum(dim=1, keepdim=True).expand(4, 5)
    torch.testing.assert_close(module(*args), expected)


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_compiled_scores_match_per_example_gradients_in_float32(problem: str) -> None:
    if problem == "mlp":
        model = tiny_mlp(3, activation="relu").float()
        inputs, targets = tiny_data("classes3", 70)
    else:
        model = tiny_cnn().float()
        inputs, targets = tiny_data("images3", 30)
    train = (inputs.float(), targets)
    compiled = InfluenceEngine(model, train=train, batch_size=16, compile_scoring=True)
    eager = InfluenceEngine(model, train=train, batch_size=16)
    directions = torch.randn(3, eager.num_params)
    # k = 1, then k = 3 in groups of 2 and 1; the last batch of examples is padded
    for k in (1, 3):
        scores = compiled.scores_from_s_test(directions[:k], method="jvp")
        expected = eager.scores_from_s_test(directions[:k], method="grad")
        assert rel_error(scores, expected) < RTOL_F32
    assert compiled.compiled_scoring.status == "compiled"
    assert compiled.compiled_scoring.compile_seconds > 0


def test_the_graph_pass_rewrites_the_compiled_scoring_graph() -> None:
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), compile_scoring=True)
    with torch._inductor.config.patch(fx_graph_cache=False):  # the pass runs only on a miss
        engine.scores_from_s_test(torch.randn(1, engine.num_params), method="jvp")
    graph_pass = engine.compiled_scoring.graph_pass
    assert graph_pass.zero_products == 1  # the first layer's product with the input's tangent
    assert graph_pass.unfused >= 4  # the primal's two biases and both layers' tangents


def test_compiled_scoring_without_the_graph_pass_gives_the_same_scores() -> None:
    """The benchmark's ablation: ``torch.compile`` alone."""
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), batch_size=16)
    direction = torch.randn(1, engine.num_params)
    expected = engine.scores_from_s_test(direction, method="grad")
    engine.compiled_scoring = CompiledDirectional(engine.fmodel, engine.loss, graph_pass=False)
    assert engine.compiled_scoring.graph_pass is None
    assert rel_error(engine.scores_from_s_test(direction, method="jvp"), expected) < RTOL_F32
    assert engine.compiled_scoring.status == "compiled"


def _engine_with(compiled_pass: Callable[..., Tensor]) -> InfluenceEngine:
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), compile_scoring=True)
    engine.compiled_scoring._compiled = compiled_pass
    return engine


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_compiled_scoring_falls_back_to_eager_with_a_warning(failure: str) -> None:
    def broken(*args: Tensor) -> Tensor:
        if failure == "raises":
            raise RuntimeError("no compiler here")
        return engine.compiled_scoring._eager(*args) * 1.01

    engine = _engine_with(broken)
    direction = torch.randn(1, engine.num_params)
    with pytest.warns(RuntimeWarning, match="scoring eagerly"):
        scores = engine.scores_from_s_test(direction, method="jvp")
    expected = engine.scores_from_s_test(direction, method="grad")
    assert rel_error(scores, expected) < RTOL_F32
    status = engine.compiled_scoring.status
    reason = "RuntimeError: no compiler here" if failure == "raises" else "differs from eager"
    assert status.startswith("eager: ") and reason in status
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on, without new warnings
        again = engine.scores_from_s_test(direction, method="jvp")
    assert rel_error(again, expected) < RTOL_F32


def test_each_new_shape_is_checked_against_eager() -> None:
    def wrong_for_pairs(*args: Tensor) -> Tensor:
        values = engine.compiled_scoring._eager(*args)
        return values * 1.5 if args[1].shape[0] == 2 else values

    engine = _engine_with(wrong_for_pairs)
    directions = torch.randn(2, engine.num_params)
    engine.scores_from_s_test(directions[:1], method="jvp")
    assert engine.compiled_scoring.status == "compiled"
    with pytest.warns(RuntimeWarning, match="differs from eager"):
        scores = engine.scores_from_s_test(directions, method="jvp")
    expected = engine.scores_from_s_test(directions, method="grad")
    assert rel_error(scores, expected) < RTOL_F32


def test_a_failure_partway_finishes_eagerly_with_progress_in_order() -> None:
    calls = 0

    def fails_second_time(*args: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("lost the compiler")
        return engine.compiled_scoring._eager(*args)

    engine = _engine_with(fails_second_time)
    engine.operator.batch_size = 7  # batches of 7 rows: 20 = 7 + 7 + 6 (padded)
    direction = torch.randn(1, engine.num_params)
    reported: list[float] = []
    with pytest.warns(RuntimeWarning, match="lost the compiler"):
        scores = engine.scores_from_s_test(
            direction, method="jvp", progress=lambda fraction, _: reported.append(fraction)
        )
    expected = engine.scores_from_s_test(direction, method="grad")
    assert rel_error(scores, expected) < RTOL_F32
    assert reported == [7 / 20, 14 / 20, 1.0]


def test_shapes_past_dynamos_recompile_limit_run_eagerly_with_a_warning() -> None:
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), compile_scoring=True)
    directions = torch.randn(2, engine.num_params)
    # not monkeypatch: its undo deletes the setting from Dynamo's config module
    with torch._dynamo.config.patch(recompile_limit=1):
        engine.scores_from_s_test(directions[:1], method="jvp")
        with pytest.warns(RuntimeWarning, match="more than 1 input shapes; this one scoring"):
            scores = engine.scores_from_s_test(directions, method="jvp")  # a pair: new shape
    expected = engine.scores_from_s_test(directions, method="grad")
    assert rel_error(scores, expected) < RTOL_F32
    assert engine.compiled_scoring.status == "compiled"  # the first shape stays compiled
