"""Acceptance-size runs of the shipped example configs (slow: minutes each on 2 cores).

They assert what docs/experiments/README.md reports. Two of issue 4's targets are not
met there; they are recorded as strict xfails so that meeting them (or a regression in
what is met) shows up. Both come from one second-order effect, checked here and in
docs/experiments/README.md: the removed point's own curvature ε∇²L_z, which the PBRF keeps
and influence drops, cancels a fraction ρ_z (its removal leverage) of the damped curvature
along the influence step, so the PBRF step is ≈ 1/(1 − ρ_z) times the influence step.
- logistic regression: linearization gap ≤ 1e-3 (measured mean 0.030, median 2e-4; the
  five points with leverage ≥ 0.05 give 99% of it). At ε = 0.1/N it holds.
- MLP on digits: pooled PBRF Pearson ≥ 0.9 (measured 0.83; train point 651 has ρ = 0.78,
  so its PBRF effect is 4.5× its influence prediction).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from influence.experiments.config import ExperimentConfig
from influence.experiments.correlation import CorrelationResult, correlate
from influence.experiments.mislabel import detect_mislabels
from influence.experiments.sweep import run_decomposition
from influence.response import Responder

CONFIGS = Path(__file__).parents[2] / "influence" / "configs"


@pytest.fixture(scope="module")
def cancer_result():
    return run_decomposition(ExperimentConfig.load(CONFIGS / "cancer_logreg.json"))


@pytest.fixture(scope="module")
def digits_result() -> CorrelationResult:
    config = ExperimentConfig.load(CONFIGS / "digits_mlp64.json")
    train_set, test_set = config.datasets()
    responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
    return correlate(responder, test_set, config.correlation)


@pytest.fixture(scope="module")
def digits_correlation(digits_result) -> dict[str, dict[str, float]]:
    return digits_result.statistics()


@pytest.mark.slow
def test_cancer_logreg_decomposition(cancer_result) -> None:
    result = cancer_result
    summary = result.summary()
    for gap in ("warm_start", "non_convergence", "solver"):
        assert summary[gap]["mean"] <= 1e-3, gap
    # The linearization gap is the removed point's second-order effect: it grows with ρ_z.
    assert spearmanr(result.gaps["linearization"], result.leverage).statistic > 0.9


@pytest.mark.slow
def test_cancer_logreg_targets_hold_at_smaller_epsilon() -> None:
    # The unmet ε = 1/N linearization target is O(ε²): at ε = 0.1/N it holds, and so does
    # the proximity closed form.
    data = json.loads((CONFIGS / "cancer_logreg.json").read_text())
    data["response"]["epsilon"] = 0.1 / 455
    result = run_decomposition(ExperimentConfig.from_dict(data))
    assert result.summary()["linearization"]["mean"] <= 1e-3
    mean = {g: sum(result.gaps[g]) for g in ("proximity", "proximity_first_order")}
    assert abs(mean["proximity"] / mean["proximity_first_order"] - 1) < 0.1


@pytest.mark.slow
def test_digits_mlp_correlation_ordering(digits_correlation) -> None:
    stats = digits_correlation
    pearson = {m: s["pearson"] for m, s in stats.items()}
    assert pearson["pbrf"] > max(pearson["cold"], pearson["warm"])
    assert pearson["warm"] < pearson["two_stage"] < pearson["pbrf"]
    assert stats["pbrf"]["spearman"] > 0.9


@pytest.mark.slow
def test_digits_mlp_pbrf_slope_is_predicted_by_removal_leverage(digits_result) -> None:
    # Per removed point, PBRF change ≈ influence prediction × 1/(1 − ρ_z) (measured within 7%).
    slopes = torch.tensor(digits_result.row_slopes("pbrf"))
    amplification = 1 / (1 - torch.tensor(digits_result.leverage))
    assert torch.allclose(slopes, amplification, rtol=0.15)
    assert int(slopes.argmax()) == int(amplification.argmax())


@pytest.mark.slow
def test_digits_mislabel_detection() -> None:
    config = ExperimentConfig.load(CONFIGS / "digits_mlp.json")
    # The config's PBRF re-ranking (300 PBRF solves, about 25 min) is left to its CLI run.
    config = replace(config, mislabel=replace(config.mislabel, pbrf_points=0))
    found = detect_mislabels(config).found_at(0.2)
    assert found["self-influence"] >= 0.8
    assert 0.1 < found["random"] < 0.3


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True, reason="issue 4 target not met: linearization gap 0.030 (second order in ε)"
)
def test_cancer_logreg_linearization_gap_target(cancer_result) -> None:
    assert cancer_result.summary()["linearization"]["mean"] <= 1e-3


@pytest.mark.slow
def test_cancer_logreg_proximity_gap_equals_its_closed_form(cancer_result) -> None:
    # Closed form with the Hessian of the down-weighted cost Q (measured mean ratio 0.987).
    summary = cancer_result.summary()
    ratio = summary["proximity"]["mean"] / summary["proximity_first_order"]["mean"]
    assert abs(ratio - 1) < 0.1
    gaps = torch.tensor(cancer_result.gaps["proximity"])
    closed = torch.tensor(cancer_result.gaps["proximity_first_order"])
    above_floor = gaps > 1e-4  # L-BFGS retraining is converged to about 1e-6 in d
    assert ((gaps / closed)[above_floor] - 1).abs().max() < 0.1


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True, reason="issue 4 target not met: PBRF Pearson 0.83 (train point 651, ρ = 0.78)"
)
def test_digits_mlp_pbrf_pearson_target(digits_correlation) -> None:
    assert digits_correlation["pbrf"]["pearson"] >= 0.9
