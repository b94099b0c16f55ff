"""Acceptance-size runs of the shipped example configs (slow: minutes each on 2 cores).

They assert what docs/experiments/README.md reports. Two of issue 4's targets are not
met there; they are recorded as strict xfails so that meeting them (or a regression in
what is met) shows up: the logistic-regression linearization gap ≤ 1e-3 (measured 0.030,
a genuine O(ε²) effect) and pooled PBRF Pearson ≥ 0.9 on the MLP (measured 0.83).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from influence.experiments.config import ExperimentConfig
from influence.experiments.correlation import correlate
from influence.experiments.mislabel import detect_mislabels
from influence.experiments.sweep import run_decomposition
from influence.response import Responder

CONFIGS = Path(__file__).parents[2] / "influence" / "configs"


@pytest.fixture(scope="module")
def cancer_result():
    return run_decomposition(ExperimentConfig.load(CONFIGS / "cancer_logreg.json"))


@pytest.fixture(scope="module")
def digits_correlation() -> dict[str, dict[str, float]]:
    config = ExperimentConfig.load(CONFIGS / "digits_mlp64.json")
    train_set, test_set = config.datasets()
    responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
    return correlate(responder, test_set, config.correlation).statistics()


@pytest.mark.slow
def test_cancer_logreg_decomposition(cancer_result) -> None:
    result = cancer_result
    summary = result.summary()
    for gap in ("warm_start", "non_convergence", "solver"):
        assert summary[gap]["mean"] <= 1e-3, gap
    ratio = torch.tensor(result.gaps["proximity"]) / torch.tensor(
        result.gaps["proximity_first_order"]
    )
    assert abs(float(ratio.median()) - 1) < 0.1


@pytest.mark.slow
def test_digits_mlp_correlation_ordering(digits_correlation) -> None:
    stats = digits_correlation
    pearson = {m: s["pearson"] for m, s in stats.items()}
    assert pearson["pbrf"] > max(pearson["cold"], pearson["warm"])
    assert pearson["warm"] < pearson["two_stage"] < pearson["pbrf"]
    assert stats["pbrf"]["spearman"] > 0.9


@pytest.mark.slow
def test_digits_mislabel_detection() -> None:
    found = detect_mislabels(ExperimentConfig.load(CONFIGS / "digits_mlp.json")).found_at(0.2)
    assert found["self-influence"] >= 0.8
    assert 0.1 < found["random"] < 0.3


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 4 target not met: linearization gap 0.030")
def test_cancer_logreg_linearization_gap_target(cancer_result) -> None:
    assert cancer_result.summary()["linearization"]["mean"] <= 1e-3


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 4 target not met: PBRF Pearson 0.83 (one outlier)")
def test_digits_mlp_pbrf_pearson_target(digits_correlation) -> None:
    assert digits_correlation["pbrf"]["pearson"] >= 0.9
