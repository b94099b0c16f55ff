"""stream_scores: both paths against a dense float64 reference, one test point in float32,
and per-batch progress."""

from __future__ import annotations

import pytest
import torch

from influence.functional import FlatModel
from influence.scoring import stream_scores
from models.losses import get_loss
from tests.conftest import RTOL_EXACT, RTOL_F32, rel_error
from tests.influence.problems import loop_grads, tiny_data, tiny_mlp


@pytest.mark.parametrize("method", ["jvp", "grad"])
def test_streamed_scores_match_dense_gradients_and_report_each_batch(method: str) -> None:
    model = tiny_mlp(3)
    inputs, targets = tiny_data("classes3", 11)
    fmodel, theta = FlatModel.of(model)
    s_test = torch.randn(2, theta.numel(), dtype=torch.float64)
    reported: list[tuple[float, str]] = []
    scores = stream_scores(
        fmodel, get_loss("cross_entropy"), theta, inputs, targets, s_test,
        num_train=20, batch_size=4, method=method,
        progress=lambda fraction, phase: reported.append((fraction, phase)),
    )  # fmt: skip
    expected = s_test @ loop_grads(model, "cross_entropy", inputs, targets).T / 20
    assert rel_error(scores, expected) < RTOL_EXACT
    assert reported == [(4 / 11, "score"), (8 / 11, "score"), (1.0, "score")]


def test_one_test_point_scores_agree_between_paths_in_float32() -> None:
    """k = 1 takes the plain-``jvp`` branch; it must agree with per-example gradients."""
    model = tiny_mlp(3, activation="relu").float()
    inputs, targets = tiny_data("classes3", 300)
    fmodel, theta = FlatModel.of(model)
    s_test = torch.randn(1, theta.numel())
    loss = get_loss("cross_entropy")
    x = inputs.float()
    jvp = stream_scores(fmodel, loss, theta, x, targets, s_test, num_train=300, batch_size=64)
    grad = stream_scores(
        fmodel, loss, theta, x, targets, s_test, num_train=300, batch_size=64, method="grad"
    )
    assert jvp.shape == grad.shape == (1, 300)
    assert rel_error(jvp, grad) < RTOL_F32


def test_an_error_raised_by_progress_stops_jvp_scoring_cleanly() -> None:
    """The worker cancels a job by raising from ``progress``; the forward-mode transform
    must unwind so that the next scoring call is unaffected."""
    model = tiny_mlp(3)
    inputs, targets = tiny_data("classes3", 9)
    fmodel, theta = FlatModel.of(model)
    loss = get_loss("cross_entropy")
    s_test = torch.randn(1, theta.numel(), dtype=torch.float64)

    def cancel(fraction: float, phase: str) -> None:
        if fraction > 0.5:
            raise RuntimeError("canceled")

    with pytest.raises(RuntimeError, match="canceled"):
        stream_scores(
            fmodel, loss, theta, inputs, targets, s_test, num_train=9, batch_size=3,
            method="jvp", progress=cancel,
        )  # fmt: skip
    scores = stream_scores(fmodel, loss, theta, inputs, targets, s_test, num_train=9, batch_size=3)
    expected = s_test @ loop_grads(model, "cross_entropy", inputs, targets).T / 9
    assert rel_error(scores, expected) < RTOL_EXACT
