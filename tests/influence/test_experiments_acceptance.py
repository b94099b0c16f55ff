"""Acceptance-size runs of the shipped example configs (slow: minutes each on 2 cores).

They assert what docs/experiments/README.md reports. Two of issue 4's targets are not
met there and are not asserted: the logistic-regression linearization gap
(0.030, a genuine O(ε²) effect) and pooled PBRF Pearson ≥ 0.9 on the MLP (0.83).
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


@pytest.mark.slow
def test_cancer_logreg_decomposition() -> None:
    result = run_decomposition(ExperimentConfig.load(CONFIGS / "cancer_logreg.json"))
    summary = result.summary()
    for gap in ("warm_start", "non_convergence", "solver"):
        assert summary[gap]["mean"] <= 1e-3, gap
    ratio = torch.tensor(result.gaps["proximity"]) / torch.tensor(
        result.gaps["proximity_first_order"]
    )
    assert abs(float(ratio.median()) - 1) < 0.1


@pytest.mark.slow
def test_digits_mlp_correlation_ordering() -> None:
    config = ExperimentConfig.load(CONFIGS / "digits_mlp64.json")
    train_set, test_set = config.datasets()
    responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
    stats = correlate(responder, test_set, config.correlation).statistics()
    pearson = {m: s["pearson"] for m, s in stats.items()}
    assert pearson["pbrf"] > max(pearson["cold"], pearson["warm"])
    assert pearson["warm"] < pearson["two_stage"] < pearson["pbrf"]
    assert stats["pbrf"]["spearman"] > 0.9


@pytest.mark.slow
def test_digits_mislabel_detection() -> None:
    found = detect_mislabels(ExperimentConfig.load(CONFIGS / "digits_mlp.json")).found_at(0.2)
    assert found["self-influence"] >= 0.8
    assert 0.1 < found["random"] < 0.3
