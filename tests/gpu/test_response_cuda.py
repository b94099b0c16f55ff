"""Training, response functions, influence and the decomposition on CUDA agree with the
CPU (skipped without CUDA).

A tiny float64 MLP: the CUDA results differ from the CPU's by rounding only (θ⁰ and the
batch orders are drawn on the CPU on both), so they agree to ``RTOL_SOLVE``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from influence.decomposition import DecompositionArguments, decompose, first_order_proximity
from influence.experiments.config import CorrelationArguments, MislabelArguments
from influence.experiments.correlation import correlate
from influence.experiments.mislabel import detect_mislabels_on
from influence.response import Responder, ResponseArguments
from models import Dataset, Recipe, TrainRun, train
from tests.conftest import RTOL_SOLVE, rel_error
from tests.influence.problems import three_class_set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = {"architecture": "mlp", "in_features": 3, "out_features": 3, "hidden": [6],
          "activation": "tanh"}  # fmt: skip
RECIPE = Recipe(optimizer="sgd", lr=0.2, epochs=6, batch_size=8, weight_decay=1e-2, seed=1)
ARGUMENTS = ResponseArguments(damping=1e-2)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return three_class_set(32, seed=0)


@pytest.fixture(scope="module")
def run(data: Dataset) -> TrainRun:
    return train(CONFIG, data, RECIPE, dtype=torch.float64)


@pytest.fixture(scope="module")
def pair(run: TrainRun, data: Dataset) -> tuple[Responder, Responder]:
    """The same recorded run's responders on the CPU and on CUDA."""
    cuda = Responder.from_run(run, data, ResponseArguments(damping=1e-2, device="cuda"))
    return Responder.from_run(run, data, ARGUMENTS), cuda


def test_training_on_cuda_matches_cpu_and_is_recorded_on_cpu(run: TrainRun, data: Dataset):
    on_cuda = train(CONFIG, data, RECIPE, dtype=torch.float64, device="cuda")
    assert all(v.device.type == "cpu" for v in [*on_cuda.thetas.values(), *on_cuda.batch_order])
    for k in run.theta0:
        assert torch.equal(on_cuda.theta0[k], run.theta0[k])
        assert rel_error(on_cuda.thetas[k], run.thetas[k]) < RTOL_SOLVE, k
    assert all(torch.equal(a, b) for a, b in zip(on_cuda.batch_order, run.batch_order, strict=True))
    assert on_cuda.losses == pytest.approx(run.losses, rel=RTOL_SOLVE)


def test_responder_lives_on_cuda(pair: tuple[Responder, Responder]) -> None:
    _, cuda = pair
    assert cuda.theta_s.device.type == "cuda" and cuda.inputs.device.type == "cuda"
    assert cuda.engine.operator.device.type == "cuda"
    assert cuda.retrain("warm", [1]).device.type == "cuda"


@pytest.mark.parametrize("method", ["pbrf", "cold", "two_stage"])
def test_retraining_on_cuda_matches_cpu(pair: tuple[Responder, Responder], method: str) -> None:
    cpu, cuda = pair
    expected = cpu.retrain(method, [3])
    got = cuda.retrain(method, [3])
    assert rel_error(got.cpu() - cpu.theta_s, expected - cpu.theta_s) < RTOL_SOLVE


def test_influence_and_leverage_on_cuda_match_cpu(pair: tuple[Responder, Responder]) -> None:
    cpu, cuda = pair
    removed = [[3], [5, 7]]
    expected, _ = cpu.influence(removed)
    got, report = cuda.influence(removed)
    assert got.device.type == "cuda" and report.relative_residual < RTOL_SOLVE
    assert rel_error(got.cpu() - cpu.theta_s, expected - cpu.theta_s) < RTOL_SOLVE
    leverage = cuda.removal_leverage(removed, got).cpu()
    assert rel_error(leverage, cpu.removal_leverage(removed, expected)) < RTOL_SOLVE


def test_decomposition_on_cuda_matches_cpu(pair: tuple[Responder, Responder]) -> None:
    cpu, cuda = pair
    arguments = DecompositionArguments(num_points=2)
    expected, got = decompose(cpu, arguments), decompose(cuda, arguments)
    assert got.removed == expected.removed and got.gaps.keys() == expected.gaps.keys()
    for name, values in expected.gaps.items():
        assert got.gaps[name] == pytest.approx(values, rel=RTOL_SOLVE), name
    assert got.leverage == pytest.approx(expected.leverage, rel=RTOL_SOLVE)


def test_first_order_proximity_on_cuda_matches_cpu() -> None:
    # Needs a converged θˢ (H_Q positive definite): L-BFGS logistic regression.
    config = {"architecture": "logistic_regression", "in_features": 3, "num_classes": 2}
    recipe = Recipe(optimizer="lbfgs", lr=1.0, epochs=4, weight_decay=0.01, loss="bce")
    data = three_class_set(32, seed=2)
    data = Dataset(data.inputs, (data.targets > 0).long(), {**data.metadata, "num_classes": 2})
    run = train(config, data, recipe, dtype=torch.float64)
    cpu, cuda = (
        Responder.from_run(run, data, ResponseArguments(damping=1e-2, device=device))
        for device in ("cpu", "cuda")
    )
    removed = [[3], [5, 7]]
    expected = first_order_proximity(cpu, removed)
    assert first_order_proximity(cuda, removed) == pytest.approx(expected, rel=RTOL_SOLVE)


def test_correlation_on_cuda_matches_cpu_and_comes_back_on_cpu(
    pair: tuple[Responder, Responder],
) -> None:
    cpu, cuda = pair
    arguments = CorrelationArguments(num_points=2, num_test=3, methods=("warm", "pbrf"))
    test_set = three_class_set(8, seed=1)
    expected, got = correlate(cpu, test_set, arguments), correlate(cuda, test_set, arguments)
    assert got.predicted.device.type == "cpu"
    assert all(a.device.type == "cpu" for a in got.actual.values())
    assert rel_error(got.predicted, expected.predicted) < RTOL_SOLVE
    for method, actual in expected.actual.items():
        assert rel_error(got.actual[method], actual) < RTOL_SOLVE, method
    assert got.to_dict()["removed"] == expected.to_dict()["removed"]


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_mislabel_detection_on_cuda_matches_cpu(data: Dataset, solver: str) -> None:
    arguments = MislabelArguments(fraction=0.25, seed=0, solver=solver, pbrf_points=4)
    results = [
        detect_mislabels_on(CONFIG, RECIPE, data, replace(ARGUMENTS, device=device), arguments)
        for device in ("cpu", "cuda")
    ]
    cpu, cuda = (r.details["pbrf_self_influence"] for r in results)
    assert cuda["indices"] == cpu["indices"]
    for key in ("pbrf", "influence"):
        assert rel_error(torch.tensor(cuda[key]), torch.tensor(cpu[key])) < RTOL_SOLVE, key
    assert results[1].curves.keys() == results[0].curves.keys()
