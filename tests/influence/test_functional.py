"""Per-example gradients and directional derivatives against a loop of torch.func.grad."""

from __future__ import annotations

import pytest
import torch

from influence.functional import (
    FlatModel,
    per_example_directional,
    per_example_grads,
    summed_grad,
)
from models.losses import get_loss
from tests.conftest import RTOL_EXACT, rel_error
from tests.influence.problems import loop_grads, tiny_cnn, tiny_data, tiny_lm, tiny_mlp

CASES = {
    "mlp-cross_entropy": (lambda: tiny_mlp(3), "classes3", "cross_entropy"),
    "mlp-bce": (lambda: tiny_mlp(2), "binary2", "bce"),
    "cnn-cross_entropy": (tiny_cnn, "images3", "cross_entropy"),
    "lm-token_cross_entropy": (tiny_lm, "tokens3", "cross_entropy"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("k", "chunk"), [(3, None), (1, 2)])
def test_vmapped_gradients_and_jvps_match_a_loop(case: str, k: int, chunk: int | None) -> None:
    """k = 3 directions (vmapped ``jvp``) in one chunk, and k = 1 (plain ``jvp``) over
    uneven chunks of 2 + 2 + 1 examples, against a loop of ``grad``."""
    build, data_kind, loss_name = CASES[case]
    model = build()
    inputs, targets = tiny_data(data_kind, 5)
    fmodel, theta = FlatModel.of(model)
    loss = get_loss(loss_name)
    reference = loop_grads(model, loss_name, inputs, targets)
    grads = per_example_grads(fmodel, loss, theta, inputs, targets)
    assert rel_error(grads, reference) < RTOL_EXACT
    directions = torch.randn(k, theta.numel(), dtype=torch.float64)
    ends: list[int] = []
    along = per_example_directional(
        fmodel, loss, theta, inputs, targets, directions, chunk, ends.append
    )
    assert along.shape == (k, 5)
    assert rel_error(along, directions @ reference.T) < RTOL_EXACT
    assert ends == ([5] if chunk is None else [2, 4, 5])
    assert (
        rel_error(summed_grad(fmodel, loss, theta, inputs, targets), reference.sum(0)) < RTOL_EXACT
    )


def test_directional_derivatives_keep_no_graph_and_handle_no_examples() -> None:
    """Activations are not kept for a backward pass even if θ requires grad (memory stays
    one chunk's), and an empty batch gives ``[k, 0]``."""
    model = tiny_mlp(3)
    inputs, targets = tiny_data("classes3", 4)
    fmodel, theta = FlatModel.of(model)
    loss = get_loss("cross_entropy")
    directions = torch.randn(2, theta.numel(), dtype=torch.float64)
    along = per_example_directional(
        fmodel, loss, theta.requires_grad_(True), inputs, targets, directions, 3
    )
    assert along.shape == (2, 4) and along.grad_fn is None and not along.requires_grad
    empty = per_example_directional(fmodel, loss, theta, inputs[:0], targets[:0], directions)
    assert empty.shape == (2, 0)


def test_flat_model_round_trips_parameters_and_skips_frozen_ones() -> None:
    model = tiny_mlp(3)
    model[0].bias.requires_grad_(False)
    fmodel, theta = FlatModel.of(model)
    assert "0.bias" not in fmodel.names
    assert fmodel.size == theta.numel() == sum(p.numel() for p in model.parameters()) - 6
    x = tiny_data("classes3", 4)[0]
    torch.testing.assert_close(fmodel(theta, x), model(x), rtol=0, atol=0)
    assert fmodel(theta + 1.0, x).sub(model(x)).abs().max() > 0
