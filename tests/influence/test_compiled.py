"""Compiled JVP scoring: the zero-product pass on a graph, compiled scores against
per-example gradients (MLP with a partial last batch, CNN, k = 1 and k = 3), and the
fallbacks to eager when compiling fails or disagrees."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from influence import InfluenceEngine
from influence.compiled import JvpProducts
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
    for k in (1, 3):  # the last batch is partial: a second shape
        scores = compiled.scores_from_s_test(directions[:k], method="jvp")
        expected = eager.scores_from_s_test(directions[:k], method="grad")
        assert rel_error(scores, expected) < RTOL_F32
    assert compiled.compiled_scoring.status == "compiled"
    assert compiled.compiled_scoring.compile_seconds > 0


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_compiled_scoring_falls_back_to_eager_with_a_warning(failure: str) -> None:
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), compile_scoring=True)
    compiled = engine.compiled_scoring
    eager_pass = compiled._eager

    def broken(*args: Tensor) -> Tensor:
        if failure == "raises":
            raise RuntimeError("no compiler here")
        return eager_pass(*args) * 1.01

    compiled._compiled = broken
    direction = torch.randn(1, engine.num_params)
    with pytest.warns(RuntimeWarning, match="scoring eagerly"):
        scores = engine.scores_from_s_test(direction, method="jvp")
    expected = engine.scores_from_s_test(direction, method="grad")
    assert rel_error(scores, expected) < RTOL_F32
    reason = "RuntimeError: no compiler here" if failure == "raises" else "differs from eager"
    assert compiled.status.startswith("eager: ") and reason in compiled.status
    again = engine.scores_from_s_test(direction, method="jvp")  # stays eager, no new warning
    assert rel_error(again, expected) < RTOL_F32


def test_more_shapes_than_dynamo_compiles_fall_back_to_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = tiny_mlp(3).float()
    inputs, targets = tiny_data("classes3", 20)
    engine = InfluenceEngine(model, train=(inputs.float(), targets), compile_scoring=True)
    directions = torch.randn(3, engine.num_params)
    engine.scores_from_s_test(directions[:1], method="jvp")
    assert engine.compiled_scoring.status == "compiled"
    with pytest.warns(RuntimeWarning, match="more than 1 input shapes"):
        scores = engine.scores_from_s_test(directions, method="jvp")  # a group of 4: new shape
    expected = engine.scores_from_s_test(directions, method="grad")
    assert rel_error(scores, expected) < RTOL_F32
    assert engine.compiled_scoring.status.startswith("eager: ")
