"""Curvature products against dense matrices built independently by torch.func."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from influence.functional import FlatModel
from influence.operators import DampedCurvature
from models.losses import get_loss
from tests.conftest import RTOL_EXACT, rel_error
from tests.influence.problems import (
    dense_gnh,
    dense_hessian,
    tiny_cnn,
    tiny_data,
    tiny_lm,
    tiny_mlp,
)

WEIGHT_DECAY = 0.01

CASES: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "mlp-cross_entropy": (lambda: tiny_mlp(3), "classes3", "cross_entropy"),
    "mlp-mse": (lambda: tiny_mlp(2), "regression2", "mse"),
    "mlp-bce": (lambda: tiny_mlp(2), "binary2", "bce"),
    "cnn-cross_entropy": (tiny_cnn, "images3", "cross_entropy"),
    "lm-token_cross_entropy": (tiny_lm, "tokens3", "cross_entropy"),
}


def _operator(
    model: nn.Module, loss: str, data, kind: str, batch_size: int = 4, damping: float = 0.0
) -> DampedCurvature:
    fmodel, theta = FlatModel.of(model)
    return DampedCurvature(
        fmodel, theta, get_loss(loss), *data, kind=kind, weight_decay=WEIGHT_DECAY,
        damping=damping, batch_size=batch_size,
    )  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["gnh", "full"])
def test_products_match_dense_torch_func_matrices(case: str, kind: str) -> None:
    build, data_kind, loss = CASES[case]
    model = build()
    data = tiny_data(data_kind, 5)
    reference = (dense_gnh if kind == "gnh" else dense_hessian)(
        model, loss, *data, weight_decay=WEIGHT_DECAY
    )
    op = _operator(model, loss, data, kind, batch_size=3)  # chunks of 3 and 2
    assert rel_error(op.dense(), reference) < RTOL_EXACT
    v = torch.randn(op.size, dtype=torch.float64)
    assert rel_error(op.matvec(v), reference @ v) < RTOL_EXACT
    if kind == "gnh":  # the Gauss-Newton matrix is PSD by construction; the Hessian is not
        assert float(torch.linalg.eigvalsh(op.dense())[0]) > 0


@pytest.mark.parametrize("kind", ["gnh", "full"])
def test_damping_adds_lambda_identity(kind: str) -> None:
    model, data = tiny_mlp(3), tiny_data("classes3", 6)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    plain = _operator(model, "cross_entropy", data, kind).matvec(v)
    damped = _operator(model, "cross_entropy", data, kind, damping=0.5).matvec(v)
    assert rel_error(damped, plain + 0.5 * v) < RTOL_EXACT


@pytest.mark.parametrize("case", ["mlp-cross_entropy", "lm-token_cross_entropy"])
@pytest.mark.parametrize("kind", ["gnh", "full"])
def test_batch_size_invariance_and_vmap_matches_loop(case: str, kind: str) -> None:
    build, data_kind, loss = CASES[case]
    model, data = build(), tiny_data(data_kind, 7)
    ops = [_operator(model, loss, data, kind, batch_size=b) for b in (1, 3, 7)]
    vectors = torch.randn(ops[0].size, 3, dtype=torch.float64)
    batched = [op.matmat(vectors) for op in ops]
    for other in batched[1:]:
        assert rel_error(other, batched[0]) < RTOL_EXACT
    looped = torch.stack([ops[1].matvec(vectors[:, j]) for j in range(3)], dim=1)
    assert rel_error(batched[1], looped) < RTOL_EXACT


def test_minibatch_curvature_is_the_subset_operator() -> None:
    model, data = tiny_mlp(3), tiny_data("classes3", 8)
    op = _operator(model, "cross_entropy", data, "gnh")
    subset = torch.tensor([1, 4, 6])
    sub_op = _operator(model, "cross_entropy", (data[0][subset], data[1][subset]), "gnh")
    v = torch.randn(op.size, dtype=torch.float64)
    assert rel_error(op.curvature(v, subset), sub_op.curvature(v)) < RTOL_EXACT


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "diag"}, "hessian"),
        ({"damping": -1.0}, "damping"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_operator_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    fmodel, theta = FlatModel.of(tiny_mlp(3))
    with pytest.raises(ValueError, match=field):
        DampedCurvature(
            fmodel, theta, get_loss("cross_entropy"), *tiny_data("classes3", 4), **kwargs
        )


def test_matvec_rejects_a_matrix() -> None:
    op = _operator(tiny_mlp(3), "cross_entropy", tiny_data("classes3", 4), "gnh")
    with pytest.raises(ValueError, match=r"shape \[d\]"):
        op.matvec(torch.zeros(op.size, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "case", ["mlp-cross_entropy", "cnn-cross_entropy", "lm-token_cross_entropy"]
)
@pytest.mark.parametrize("kind", ["gnh", "full"])
def test_replayed_minibatch_products_match_dense_subset_matrices(case: str, kind: str) -> None:
    """Traced once, replayed on other minibatches: still the subset's exact curvature."""
    build, data_kind, loss = CASES[case]
    model, data = build(), tiny_data(data_kind, 9)
    op = _operator(model, loss, data, kind)
    replayed = op.replayed_curvature()
    dense = dense_gnh if kind == "gnh" else dense_hessian
    vectors = torch.randn(op.size, 2, dtype=torch.float64)
    for subset in ([0, 3, 5], [1, 2, 8], [4, 6, 7], [8, 0, 2]):
        index = torch.tensor(subset)
        reference = dense(model, loss, data[0][index], data[1][index], weight_decay=WEIGHT_DECAY)
        assert rel_error(replayed(vectors, index), reference @ vectors) < RTOL_EXACT
    assert list(replayed.status.values()) == ["replayed"]


class _SignSwitch(nn.Module):
    """tanh or sin of a linear map, chosen by the sign of the batch's input sum: Python
    control flow on input values, which make_fx refuses to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        return torch.tanh(z) if float(x.sum()) > 0 else torch.sin(z)


class _Tempered(nn.Module):
    """A linear map divided by a plain Python float, whose value a trace bakes in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3).double()
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) / self.temperature


def _operator_on_signed_inputs(module: nn.Module) -> DampedCurvature:
    torch.manual_seed(0)
    inputs = torch.cat([torch.rand(4, 5), -torch.rand(4, 5)]).double()
    return _operator(module, "cross_entropy", (inputs, torch.randint(3, (8,))), "gnh")


def test_replay_stays_eager_for_a_model_make_fx_cannot_trace() -> None:
    op = _operator_on_signed_inputs(_SignSwitch())
    replayed = op.replayed_curvature()
    vectors = torch.randn(op.size, 2, dtype=torch.float64)
    for subset in ([0, 1, 2], [5, 6, 7], [1, 2, 3]):
        index = torch.tensor(subset)
        assert rel_error(replayed(vectors, index), op.curvature(vectors, index)) < RTOL_EXACT
    assert list(replayed.status.values()) == ["eager"]


def test_replay_stays_eager_when_its_first_replay_disagrees_with_eager() -> None:
    module = _Tempered()
    op = _operator_on_signed_inputs(module)
    replayed = op.replayed_curvature()
    vectors = torch.randn(op.size, 2, dtype=torch.float64)
    replayed(vectors, torch.tensor([0, 1, 2]))  # traced at temperature 1
    module.temperature = 2.0
    for subset in ([5, 6, 7], [1, 2, 3]):
        index = torch.tensor(subset)
        assert rel_error(replayed(vectors, index), op.curvature(vectors, index)) < RTOL_EXACT
    assert list(replayed.status.values()) == ["eager"]


@pytest.mark.parametrize("kind", ["gnh", "full"])
def test_downweighted_operator_drops_epsilon_of_the_removed_examples_curvature(kind) -> None:
    model, data = tiny_mlp(3), tiny_data("classes3", 8)
    dense = dense_gnh if kind == "gnh" else dense_hessian
    removed, epsilon = torch.tensor([2, 5]), 0.1
    op = _operator(model, "cross_entropy", data, kind, damping=0.5)
    down = op.downweighted(removed, epsilon)
    own = dense(model, "cross_entropy", data[0][removed], data[1][removed], weight_decay=0.0)
    full = dense(model, "cross_entropy", *data, weight_decay=WEIGHT_DECAY)
    expected = full - epsilon * len(removed) * own + 0.5 * torch.eye(op.size, dtype=torch.float64)
    assert rel_error(down.dense(), expected) < RTOL_EXACT
    subset = torch.tensor([0, 2, 7])
    v = torch.randn(op.size, dtype=torch.float64)
    on_subset = op.curvature(v, subset) - epsilon * len(removed) * own @ v
    assert rel_error(down.curvature(v, subset), on_subset) < RTOL_EXACT
    assert rel_error(down.replayed_curvature()(v, subset), on_subset) < RTOL_EXACT
