"""InfluenceEngine's handling of what users hand it: half-precision models, class-index
targets, the construction-time probe of the model's transforms, unbatched or misshapen
test points, solver classes, torch loss modules, unavailable devices, and the advice in
``NegativeCurvatureError`` for each curvature kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import models
from influence import CG, Exact, InfluenceEngine, NegativeCurvatureError
from models.losses import get_loss
from tests.conftest import RTOL_SOLVE, rel_error
from tests.influence.problems import (
    TINY_LM_CONFIG,
    dense_gnh,
    reference_scores,
    tiny_data,
    tiny_lm,
    tiny_mlp,
)

DAMPING = 1e-3
WEIGHT_DECAY = 0.01
RTOL_FLOAT32_SOLVE = 1e-4
"""A float32 solve and scoring against a float64 reference: float32 rounding (~1e-7)
amplified by the conditioning; bfloat16 arithmetic is ~1e-2 off."""


def _reference(model: nn.Module, loss: str, train: tuple, test: tuple) -> Tensor:
    """Dense float64 scores of ``model`` (its weights taken exactly, in float64)."""
    exact = copy.deepcopy(model).double()
    train64 = tuple(t.double() if t.is_floating_point() else t for t in train)
    test64 = tuple(t.double() if t.is_floating_point() else t for t in test)
    matrix = dense_gnh(exact, loss, *train64, WEIGHT_DECAY)
    matrix += DAMPING * torch.eye(len(matrix), dtype=torch.float64)
    return reference_scores(exact, loss, train64, test64, matrix)


# ----------------------------------------------------------------------------- B1: dtype


@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-6)], ids=["exact", "cg"])
def test_a_bfloat16_model_is_computed_in_float32_and_matches_a_float64_reference(
    solver,
) -> None:
    model = tiny_mlp(3).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = tiny_data("classes3", 40), tiny_data("classes3", 3, seed=1)
    engine = InfluenceEngine(model, train=train, damping=DAMPING, weight_decay=WEIGHT_DECAY)
    assert engine.dtype == torch.float32 and engine.theta.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16  # the user's model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = engine.scores(test, solver)
    assert result.scores.dtype == torch.float32 and result.report.converged
    expected = _reference(model, "cross_entropy", train, test)
    assert rel_error(result.scores.double(), expected) < RTOL_FLOAT32_SOLVE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_explicit_half_precision_dtype_is_refused(dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=f"dtype {name} is too coarse.*at least float32"):
        InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 4), dtype=dtype)


# ----------------------------------------------------------------------------- B2: targets

_FLOAT_TARGETS = r"cross_entropy targets must be integer class indices \[0, 3\), got float(32|64)"


def test_floating_point_targets_are_refused_for_cross_entropy_but_not_for_mse_or_bce() -> None:
    inputs, labels = tiny_data("classes3", 12)
    shifted = labels.float() + 0.9  # used to be truncated back to the labels, silently
    one_hot = nn.functional.one_hot(labels, 3).float()
    for targets in (shifted, one_hot):
        with pytest.raises(ValueError, match=_FLOAT_TARGETS):
            InfluenceEngine(tiny_mlp(3), train=(inputs, targets))
    engine = InfluenceEngine(tiny_mlp(3), train=(inputs, labels))
    with pytest.raises(ValueError, match="the test targets: " + _FLOAT_TARGETS):
        engine.scores((inputs[:2], shifted[:2]), Exact())
    # the loss itself refuses them (training, response functions and the worker call it)
    with pytest.raises(ValueError, match=_FLOAT_TARGETS):
        get_loss("cross_entropy").per_example(torch.zeros(2, 3), shifted[:2])
    for loss, kind in (("mse", "regression2"), ("bce", "binary2")):
        train, test = tiny_data(kind, 12), tiny_data(kind, 2, seed=1)
        assert train[1].is_floating_point()
        engine = InfluenceEngine(
            tiny_mlp(2), loss, train=train, damping=DAMPING, weight_decay=WEIGHT_DECAY
        )
        expected = _reference(engine.model, loss, train, test)
        assert rel_error(engine.scores(test, Exact()).scores, expected) < RTOL_SOLVE


def test_per_token_cross_entropy_refuses_floating_point_targets() -> None:
    tokens, next_tokens = tiny_data("tokens3", 6)
    message = r"cross_entropy targets must be integer class indices \[0, 3\), got float64"
    with pytest.raises(ValueError, match=message):
        InfluenceEngine(tiny_lm(), train=(tokens, next_tokens.double()))


def test_class_indices_outside_the_models_outputs_are_refused() -> None:
    inputs, labels = tiny_data("classes3", 12)
    bad = labels.clone()
    bad[7] = 3
    with pytest.raises(ValueError, match=r"\[0, 3\).*training targets example 7 has 3"):
        InfluenceEngine(tiny_mlp(3), train=(inputs, bad))
    engine = InfluenceEngine(tiny_mlp(3), train=(inputs, labels))
    ignored = torch.tensor([0, -100])  # F.cross_entropy's ignore_index: a zero gradient
    with pytest.raises(ValueError, match=r"\[0, 3\).*test targets example 1 has -100"):
        engine.scores((inputs[:2], ignored), Exact())
    tokens, next_tokens = tiny_data("tokens3", 6)
    next_tokens[4, 2] = 5
    with pytest.raises(ValueError, match=r"\[0, 3\).*training targets example 4 has 5"):
        InfluenceEngine(tiny_lm(), train=(tokens, next_tokens))


def test_binary_cross_entropy_targets_outside_0_1_are_refused() -> None:
    """Outside [0, 1] the bce loss is unbounded below (-1/+1 or 1/2 labels are the usual
    slip); probabilities inside it are fine."""
    inputs, targets = tiny_data("binary2", 12)
    signed = targets * 2 - 1
    with pytest.raises(ValueError, match=r"\[0, 1\].*training targets example \d+ has -1"):
        InfluenceEngine(tiny_mlp(2), "bce", train=(inputs, signed))
    engine = InfluenceEngine(tiny_mlp(2), "bce", train=(inputs, targets * 0.5 + 0.25))
    over = targets[:2].clone()
    over[1, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\].*test targets example 1 has 1.5"):
        engine.scores((inputs[:2], over), Exact())


def test_token_ids_outside_the_vocabulary_are_refused_for_every_example() -> None:
    """Checked over the whole set before any forward pass: on CUDA an out-of-range id is
    a device-side assert that breaks the process, not an error naming the example."""
    tokens, next_tokens = tiny_data("tokens3", 8)
    bad = tokens.clone()
    bad[6, 1] = 3  # past the probe's first examples
    with pytest.raises(ValueError, match=r"\[0, 3\).*training inputs example 6 has 3"):
        InfluenceEngine(tiny_lm(), train=(bad, next_tokens))
    engine = InfluenceEngine(tiny_lm(), train=(tokens, next_tokens))
    test = tokens[:3].clone()
    test[2, 0] = -1
    with pytest.raises(ValueError, match=r"\[0, 3\).*test inputs example 2 has -1"):
        engine.scores((test, next_tokens[:3]), Exact())
    data = models.Dataset(bad, next_tokens, {"task": "language_modeling"})
    with pytest.raises(models.DatasetError, match=r"vocab_size.*inputs example 6 has 3"):
        models.train(TINY_LM_CONFIG, data, models.Recipe(epochs=1))


# ----------------------------------------------------------------------------- B3: advice


@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12)], ids=["exact", "cg"])
def test_negative_curvature_advice_depends_on_the_curvature_kind(solver) -> None:
    """A singular GNH at damping 0 rounds to a tiny negative value: the advice is to raise
    damping (suggesting hessian='gnh' would be no advice); an indefinite full Hessian
    still gets both suggestions."""
    test = tiny_data("classes3", 2, seed=1)
    singular = InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 2), damping=0.0)
    with pytest.raises(NegativeCurvatureError) as gnh:
        singular.scores(test, solver)
    message = str(gnh.value)
    assert "positive semi-definite" in message and "raise damping (now 0)" in message
    assert "(near-)singular" in message and "hessian='gnh'" not in message
    assert abs(gnh.value.value) < 1e-12  # rounding, not curvature
    full = InfluenceEngine(
        tiny_mlp(3), train=tiny_data("classes3", 40), hessian="full", damping=0.0
    )
    with pytest.raises(NegativeCurvatureError, match=r"increase damping.*use hessian='gnh'"):
        full.scores(test, solver)


# ----------------------------------------------------------------------------- F1/F3: probe


class _NoForwardMode(torch.autograd.Function):
    """tanh with a backward but no jvp rule (as fused kernels such as mkldnn's LSTM)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad_output * (1 - y * y)


class _NoVmap(torch.autograd.Function):
    """tanh with backward and jvp rules but no vmap rule."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad_output * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


class _Net(nn.Module):
    def __init__(self, activation: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.activation = activation
        self.hidden, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.activation.apply(self.hidden(x)))


@pytest.mark.parametrize(
    ("activation", "message"),
    [
        (_NoForwardMode, r"does not support forward-mode autodiff \(torch.func.jvp\)"),
        (_NoVmap, r"does not support per-example gradients \(torch.func.vmap over"),
    ],
)
def test_a_model_without_a_needed_transform_is_refused_at_construction(activation, message):
    with pytest.raises(ValueError, match=message + ".*Model requirements"):
        InfluenceEngine(_Net(activation).double(), train=tiny_data("classes3", 8))


class _OutOfMemory(nn.Module):
    """Raises what a GPU out of memory raises, once ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fail:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.linear(x)


def test_running_out_of_memory_in_the_checks_is_not_called_a_model_defect() -> None:
    """Out of memory is transient (a worker retries the job); a ValueError would be final."""
    inputs, labels = tiny_data("classes3", 8)
    model = _OutOfMemory().double()
    model.fail = True
    with pytest.raises(torch.OutOfMemoryError):
        InfluenceEngine(model, train=(inputs, labels))
    model.fail = False
    engine = InfluenceEngine(model, train=(inputs, labels))
    engine.model.fail = True  # the engine's copy
    with pytest.raises(torch.OutOfMemoryError):
        engine.scores((inputs[:2], labels[:2]), Exact())


def test_inputs_the_model_cannot_take_are_named_training_or_test() -> None:
    inputs, labels = tiny_data("classes3", 8)
    with pytest.raises(ValueError, match=r"cannot take the training inputs \(per-example shape"):
        InfluenceEngine(tiny_mlp(3), train=(inputs[:, :4], labels))
    engine = InfluenceEngine(tiny_mlp(3), train=(inputs, labels))
    wrong = (inputs[:2, :4], labels[:2])
    with pytest.raises(ValueError, match=r"cannot take the test inputs \(per-example shape \[4\]"):
        engine.scores(wrong, Exact())
    with pytest.raises(ValueError, match="cannot take the test inputs"):
        engine.s_test(wrong, Exact())
    with pytest.raises(ValueError, match="cannot take the test inputs"):
        engine.group_influence([0], wrong, Exact())
    with pytest.raises(ValueError, match=r"mse loss cannot take the model's outputs"):
        InfluenceEngine(tiny_mlp(3), "mse", train=tiny_data("regression2", 8))


def test_a_model_returning_a_tuple_is_refused() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.linear(x), x

    with pytest.raises(ValueError, match="must return one Tensor of outputs, got a tuple"):
        InfluenceEngine(Pair().double(), train=tiny_data("classes3", 4))


def test_a_single_test_point_without_batch_dimension_is_refused() -> None:
    inputs, labels = tiny_data("classes3", 8)
    engine = InfluenceEngine(tiny_mlp(3), train=(inputs, labels))
    hint = r"e\.g\. \(X\[:1\], y\[:1\]\)"
    with pytest.raises(ValueError, match=r"test: .*batch dimension.*" + hint):
        engine.scores((inputs[0], labels[0]), Exact())
    regression = tiny_data("regression2", 8)
    engine = InfluenceEngine(tiny_mlp(2), "mse", train=regression)
    with pytest.raises(ValueError, match=r"look like one example.*" + hint):
        engine.scores((regression[0][0], regression[1][0]), Exact())
    tokens = tiny_data("tokens3", 6)
    engine = InfluenceEngine(tiny_lm(), train=tokens)
    with pytest.raises(ValueError, match=r"look like one example.*" + hint):
        engine.s_test((tokens[0][0], tokens[1][0]), Exact())
    assert engine.scores((tokens[0][:1], tokens[1][:1]), Exact()).scores.shape == (1, 6)


def test_a_solver_class_instead_of_an_instance_is_a_type_error() -> None:
    engine = InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 8))
    test = tiny_data("classes3", 2, seed=1)
    with pytest.raises(TypeError, match=r"solver must be an instance, e\.g\. Exact\(\)"):
        engine.scores(test, Exact)
    with pytest.raises(TypeError, match=r"solver must be an instance, e\.g\. CG\(\)"):
        engine.self_influence(CG)
    with pytest.raises(TypeError, match=r"solver must be an instance, e\.g\. Exact\(\)"):
        engine.group_influence([0, 1], test, Exact)


def test_a_torch_loss_module_is_refused_naming_the_built_in_losses() -> None:
    with pytest.raises(ValueError, match=r"'bce', 'cross_entropy', 'mse'.*models\.losses\.Loss"):
        InfluenceEngine(tiny_mlp(3), nn.CrossEntropyLoss(), train=tiny_data("classes3", 4))
    with pytest.raises(ValueError, match=r"got a MSELoss \(for MSELoss use 'mse'; note"):
        InfluenceEngine(tiny_mlp(2), nn.MSELoss(), train=tiny_data("regression2", 4))


def test_cuda_without_cuda_is_a_value_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 4), device="cuda")
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device name"):
        InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 4), device="gpu")
