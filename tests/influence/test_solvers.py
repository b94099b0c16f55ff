"""Solvers against dense float64 solves; their reports, warnings and named errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from influence import (
    CG,
    ConvergenceWarning,
    Exact,
    InfluenceEngine,
    Lanczos,
    LiSSA,
    NegativeCurvatureError,
    NonFiniteError,
    SolverDivergedError,
)
from influence.operators import DampedCurvature
from tests.conftest import RTOL_EXACT, RTOL_SOLVE, pearson, rel_error
from tests.influence.problems import (
    dense_gnh,
    dense_hessian,
    digits_mlp,
    reference_scores,
    tiny_data,
    tiny_mlp,
)

DAMPING = 1e-3
WEIGHT_DECAY = 0.01


def _tiny_engine(hessian: str = "gnh", damping: float = DAMPING) -> InfluenceEngine:
    return InfluenceEngine(
        tiny_mlp(3), train=tiny_data("classes3", 40), hessian=hessian, damping=damping,
        weight_decay=WEIGHT_DECAY, batch_size=16,
    )  # fmt: skip


@pytest.mark.parametrize(("hessian", "damping"), [("gnh", DAMPING), ("full", 1.0)])
@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12, max_iter=200)], ids=["exact", "cg"])
def test_exact_and_cg_scores_match_a_dense_float64_solve(hessian, damping, solver) -> None:
    engine = _tiny_engine(hessian, damping)
    train, test = tiny_data("classes3", 40), tiny_data("classes3", 4, seed=1)
    dense = (dense_gnh if hessian == "gnh" else dense_hessian)(
        engine.model, "cross_entropy", *train, weight_decay=WEIGHT_DECAY
    )
    matrix = dense + damping * torch.eye(dense.shape[0], dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(matrix)[0]) > 0  # a well-posed system
    expected = reference_scores(engine.model, "cross_entropy", train, test, matrix)
    result = engine.scores(test, solver)
    assert result.scores.shape == (4, 40)
    assert rel_error(result.scores, expected) < RTOL_SOLVE
    assert result.report.converged
    assert result.report.relative_residual < 1e-10
    assert len(result.report.details["residuals"]) == 4
    json.dumps(result.report.to_dict())  # JSON-safe for the service


def test_block_cg_matches_column_by_column_and_reports_per_column() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 3, seed=2)).T
    solver = CG(tol=1e-10)
    block, report = solver.solve(engine.operator, rhs)
    columns = [solver.solve(engine.operator, rhs[:, j])[0] for j in range(3)]
    assert rel_error(block, torch.stack(columns, dim=1)) < RTOL_SOLVE
    assert report.method == "cg"
    assert report.iterations == max(report.details["column_iterations"])
    assert max(report.details["residuals"]) == report.relative_residual < 1e-9


def test_preconditioned_cg_with_the_exact_inverse_takes_one_iteration() -> None:
    engine = _tiny_engine()
    inverse = torch.linalg.inv(engine.operator.dense())
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    solution, report = CG(tol=1e-8, preconditioner=lambda r: inverse @ r).solve(
        engine.operator, rhs
    )
    assert report.method == "pcg" and report.details["preconditioned"]
    assert report.iterations == 1
    assert report.relative_residual < 1e-8
    assert rel_error(solution, inverse @ rhs) < RTOL_SOLVE


def test_cg_at_its_iteration_limit_warns_and_says_not_converged() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        solution, report = CG(tol=1e-10, max_iter=2).solve(engine.operator, rhs)
    assert not report.converged and report.iterations == 2
    measured = (engine.operator.matmat(solution) - rhs).norm(dim=0) / rhs.norm(dim=0)
    assert report.relative_residual == pytest.approx(float(measured.max()), rel=1e-12)
    assert report.relative_residual > 1e-10


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CG(tol=-1), "tol"),
        (lambda: CG(max_iter=0), "max_iter"),
        (lambda: CG(preconditioner=3), "preconditioner"),
        (lambda: LiSSA(depth=0), "depth"),
        (lambda: LiSSA(scale=-1.0), "scale"),
        (lambda: LiSSA(average=1.0), "average"),
        (lambda: LiSSA(batch_size=0), "batch_size"),
        (lambda: Exact(max_dim=0), "max_dim"),
        (lambda: Lanczos(rank=0), "rank"),
    ],
)
def test_solver_arguments_validate_and_name_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_exact_refuses_a_large_model_and_states_the_memory() -> None:
    engine = _tiny_engine()
    message = r"d = 57 parameters exceeds max_dim = 10.*would need 25.4 KiB;"  # 57² × 8 bytes
    with pytest.raises(ValueError, match=message):
        Exact(max_dim=10).solve(engine.operator, torch.ones(57, dtype=torch.float64))


def test_non_finite_right_hand_side_is_a_named_error() -> None:
    engine = _tiny_engine()
    rhs = torch.ones(engine.num_params, dtype=torch.float64)
    rhs[3] = float("nan")
    with pytest.raises(NonFiniteError, match="right-hand side"):
        CG().solve(engine.operator, rhs)


def _nan_curvature_operator() -> DampedCurvature:
    """The tiny problem's operator with one parameter NaN (the engine refuses such a model;
    a solver handed the operator directly must still name the failure)."""
    op = _tiny_engine().operator
    theta = op.theta.clone()
    theta[0] = float("nan")
    return DampedCurvature(op.fmodel, theta, op.loss, op.inputs, op.targets,
                           weight_decay=WEIGHT_DECAY, damping=DAMPING, batch_size=16)  # fmt: skip


@pytest.mark.parametrize(
    "solver", [Exact(), CG(), LiSSA(scale=10.0, batch_size=16)], ids=["exact", "cg", "lissa"]
)
def test_non_finite_curvature_is_a_named_error(solver) -> None:
    op = _nan_curvature_operator()
    with pytest.raises(NonFiniteError, match="NaN"):
        solver.solve(op, torch.ones(op.size, dtype=op.dtype))


def test_lissa_settles_a_zero_right_hand_side_column_without_warning() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    rhs[:, 1] = 0
    solver = LiSSA(
        batch_size=16, scale=1.1 * float(torch.linalg.eigvalsh(engine.operator.dense())[-1])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        solution, report = solver.solve(engine.operator, rhs)
    assert report.converged and report.iterations < solver.depth
    assert torch.equal(solution[:, 1], torch.zeros_like(solution[:, 1]))


def test_lissa_minibatches_do_not_depend_on_where_the_scale_was_estimated() -> None:
    op = _tiny_engine().operator
    rhs = torch.ones(op.size, dtype=op.dtype)
    solver = LiSSA(depth=60, window=10, tol=1e-300, batch_size=16)
    with pytest.warns(ConvergenceWarning):
        inline, inline_report = solver.solve(op, rhs)
        calibrated, _ = solver.calibrated(op).solve(op, rhs)
    assert inline_report.details["scale"] == solver.calibrated(op).scale
    assert torch.equal(inline, calibrated)


def test_lissa_with_too_small_a_scale_raises_diverged() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    lam_max = float(torch.linalg.eigvalsh(engine.operator.dense())[-1])
    with pytest.raises(SolverDivergedError, match="scale"):
        LiSSA(scale=0.3 * lam_max, batch_size=16).solve(engine.operator, rhs)


def _dense_lissa_iterates(matrix: torch.Tensor, v: torch.Tensor, scale: float, steps: int):
    """x_1 … x_T of the LiSSA recursion with the exact (full-batch) damped matrix."""
    x, out = v.clone(), []
    for _ in range(steps):
        x = v + x - matrix @ x / scale
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize(("average", "start"), [(0.0, None), (0.5, 40), (0.8, 20)])
def test_lissa_averages_the_documented_growing_tail(average: float, start: int | None) -> None:
    """With the whole training set as the minibatch the recursion is deterministic, so
    the answer must be the mean of x_{s+1} … x_T of a dense float64 recursion, s the
    largest window·2^j ≤ (1 − average)·T (T = 130, window 10: s = 40 or 20)."""
    engine = _tiny_engine()
    op = engine.operator
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    scale = 1.1 * float(torch.linalg.eigvalsh(op.dense())[-1])
    solver = LiSSA(depth=130, window=10, average=average, scale=scale, tol=1e-300,
                   batch_size=op.num_examples)  # fmt: skip
    with pytest.warns(ConvergenceWarning, match="depth=130"):
        solution, report = solver.solve(op, rhs)
    iterates = _dense_lissa_iterates(op.dense(), rhs, scale, 130)
    expected = iterates[-1] if start is None else iterates[start:].mean(dim=0)
    assert rel_error(solution, expected / scale) < 1e-10
    assert report.iterations == 130 and not report.converged


def test_lissa_repeats_average_to_the_dense_recursion() -> None:
    """R = 3 full-batch repeats are each the deterministic recursion, so their mean must
    equal one dense float64 recursion (tail from s = 20: the largest 10·2^j ≤ 0.5·60)
    whose matrix is the independent jacrev/hessian GNH plus wd·I and λI; a sum over the
    repeats instead of their mean would be off by a factor R."""
    engine = _tiny_engine()
    op = engine.operator
    train = tiny_data("classes3", 40)
    dense = dense_gnh(engine.model, "cross_entropy", *train, weight_decay=WEIGHT_DECAY)
    matrix = dense + DAMPING * torch.eye(dense.shape[0], dtype=torch.float64)
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    scale = 1.1 * float(torch.linalg.eigvalsh(matrix)[-1])
    solver = LiSSA(depth=60, window=10, average=0.5, scale=scale, tol=1e-300, repeats=3,
                   batch_size=op.num_examples)  # fmt: skip
    with pytest.warns(ConvergenceWarning, match="depth=60"):
        solution, report = solver.solve(op, rhs)
    expected = _dense_lissa_iterates(matrix, rhs, scale, 60)[20:].mean(dim=0) / scale
    assert rel_error(solution, expected) < RTOL_EXACT
    assert report.details["steps"] == [60, 60, 60] and report.iterations == 180
    assert report.details["repeats"] == 3 and not report.converged


def test_lissa_replayed_minibatch_products_give_the_eager_answer() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    answers, reports = {}, {}
    for replay in (True, False):
        solver = LiSSA(depth=130, window=10, tol=1e-300, batch_size=16, replay=replay)
        with pytest.warns(ConvergenceWarning):
            answers[replay], reports[replay] = solver.solve(engine.operator, rhs)
    assert reports[True].details["minibatch_product"] == "replayed"
    assert "minibatch_product" not in reports[False].details
    assert rel_error(answers[True], answers[False]) < 1e-12


def test_lissa_scale_comes_from_a_short_lanczos_run() -> None:
    engine = _tiny_engine()
    op = engine.operator
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    top = float(torch.linalg.eigvalsh(op.dense())[-1]) - op.damping  # λ_max(G)
    with pytest.warns(ConvergenceWarning):  # 50 steps: only the scale matters here
        _, report = LiSSA(depth=50, batch_size=16).solve(op, rhs)
    found = report.details
    assert abs(found["lambda_max"] - top) <= 1e-2 * top
    assert found["scale_products"] < op.size  # stopped once λ_max settled
    assert found["scale"] == pytest.approx(1.1 * (found["lambda_max"] + op.damping))
    assert "lowest_ritz_damped" not in found  # G is PSD: nothing to search for


def test_lissa_on_a_positive_definite_damped_hessian_reports_its_lowest_ritz_value() -> None:
    engine = _tiny_engine("full", damping=1.0)
    op = engine.operator
    eigenvalues = torch.linalg.eigvalsh(op.dense())
    assert float(eigenvalues[0]) > 0
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    solution, report = LiSSA(batch_size=16).solve(op, rhs)
    # d = 57 < lanczos_steps: the run goes on until the Krylov space is exhausted (51
    # products here: G has repeated eigenvalues), so the Ritz values are exact.
    assert report.details["lowest_ritz_damped"] == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    assert report.details["scale_products"] <= op.size
    assert rel_error(solution, torch.linalg.solve(op.dense(), rhs)) < 0.1


def test_an_indefinite_damped_hessian_is_reported_by_every_solver() -> None:
    torch.manual_seed(3)
    model = tiny_mlp(3)
    with torch.no_grad():  # large weights: a tanh net far from any minimum
        for p in model.parameters():
            p.mul_(4.0)
    train = tiny_data("classes3", 40)
    damping = 1e-6
    dense = dense_hessian(model, "cross_entropy", *train, weight_decay=0.0)
    lowest = float(torch.linalg.eigvalsh(dense)[0]) + damping
    assert lowest < -1e-3  # really indefinite, checked on an independent dense Hessian
    engine = InfluenceEngine(model, train=train, hessian="full", damping=damping)
    rhs = engine.gradients(*tiny_data("classes3", 3, seed=1)).T
    with pytest.raises(NegativeCurvatureError, match="smallest eigenvalue") as exact:
        Exact().solve(engine.operator, rhs)
    assert exact.value.value == pytest.approx(lowest, rel=1e-8)
    with pytest.raises(NegativeCurvatureError, match="CG iteration") as cg:
        CG(tol=1e-10).solve(engine.operator, rhs)
    assert cg.value.iteration >= 1 and cg.value.value <= 0
    for solver in (LiSSA(batch_size=16), Lanczos(rank=20)):
        with pytest.raises(NegativeCurvatureError, match="not positive definite") as error:
            solver.solve(engine.operator, rhs)
        assert lowest * (1 + 1e-6) <= error.value.value <= 0
    # LiSSA's certificate: a Ritz vector's damped Rayleigh quotient, before any recursion.
    with pytest.raises(NegativeCurvatureError, match="Ritz vector y has"):
        LiSSA(batch_size=16, depth=1).solve(engine.operator, rhs)


def test_lanczos_at_full_rank_is_exact() -> None:
    engine = _tiny_engine()
    rhs = engine.gradients(*tiny_data("classes3", 2, seed=2)).T
    d = engine.num_params
    solution, report = Lanczos(rank=d, iterations=d).solve(engine.operator, rhs)
    expected = torch.linalg.solve(engine.operator.dense(), rhs)
    assert rel_error(solution, expected) < 1e-8
    assert report.relative_residual < 1e-8


def test_lanczos_reports_the_steps_it_took_when_the_krylov_space_runs_out() -> None:
    """Linear regression (mse) without weight decay: G = I₂ ⊗ (1/N) Σ [x,1][x,1]ᵀ has only
    two distinct nonzero eigenvalues on 2 points, so Lanczos stops after 3 of its 12 steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    engine = InfluenceEngine(model, loss="mse", train=tiny_data("regression2", 2), damping=1e-2)
    op = engine.operator
    products = 0
    curvature = op.curvature

    def counting(vectors: torch.Tensor, indices=None) -> torch.Tensor:
        nonlocal products
        products += 1
        return curvature(vectors, indices)

    op.curvature = counting  # type: ignore[method-assign]
    solver = Lanczos(rank=6)
    inverse = solver.factorize(op)
    assert inverse.iterations == products == 3 < solver.steps(engine.num_params) == 12
    rhs = engine.gradients(*tiny_data("regression2", 1, seed=1)).T
    assert solver.solve(op, rhs)[1].iterations == 3


def test_lissa_defaults_reach_exact_quality_on_digits_and_report_an_honest_residual() -> None:
    model, train, test = digits_mlp()
    engine = InfluenceEngine(model, train=train, dtype=torch.float64)
    queries = (test.inputs[:10], test.targets[:10])
    exact = engine.scores(queries, Exact())
    lissa = engine.scores(queries, LiSSA())
    assert pearson(lissa.scores, exact.scores) >= 0.99
    # The residual brackets the true error: ‖r‖/λ_max ≤ ‖x − x*‖ ≤ ‖r‖/λ_min.
    eigenvalues = torch.linalg.eigvalsh(engine.operator.dense())
    grads = engine.gradients(*queries)
    residual = torch.tensor(lissa.report.details["residuals"], dtype=torch.float64)
    absolute = residual * grads.norm(dim=1)
    error = (lissa.s_test - exact.s_test).norm(dim=1)
    assert (absolute / eigenvalues[-1] <= error * (1 + 1e-9)).all()
    assert (error <= absolute / eigenvalues[0] * (1 + 1e-9)).all()
    assert lissa.report.details["scale"] > float(eigenvalues[-1])  # σ > λ_max(G) + λ
    assert lissa.report.relative_residual < 0.2
    assert lissa.report.converged and lissa.report.iterations < LiSSA().depth  # early stop
