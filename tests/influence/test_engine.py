"""InfluenceEngine: scoring paths, shards, self/group influence, ranking, validation, and
predicted vs actual leave-one-out retraining."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import influence.solvers
import models
from influence import CG, ConvergenceWarning, Exact, InfluenceEngine, Lanczos, LiSSA, top_k
from influence.scoring import JVP_MAX_DIRECTIONS, resolve_method, stream_scores
from tests.conftest import RTOL_F32, RTOL_SOLVE, pearson, rel_error
from tests.influence.problems import (
    dense_gnh,
    digits_mlp,
    loop_grads,
    reference_scores,
    tiny_data,
    tiny_mlp,
)

WEIGHT_DECAY = 0.01


def _tiny_engine(**kwargs) -> InfluenceEngine:
    options = {"damping": 1e-3, "weight_decay": WEIGHT_DECAY, "batch_size": 16, **kwargs}
    return InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 40), **options)


def test_jvp_and_per_example_gradient_scoring_agree_in_float32() -> None:
    inputs, targets = tiny_data("classes3", 300)
    engine = InfluenceEngine(tiny_mlp(3).float(), train=(inputs.float(), targets), batch_size=64)
    assert engine.dtype == torch.float32
    queries = tiny_data("classes3", 6, seed=1)
    s_test, _ = engine.s_test((queries[0].float(), queries[1]), Exact())
    jvp = engine.scores_from_s_test(s_test, method="jvp")
    grad = engine.scores_from_s_test(s_test, method="grad")
    assert jvp.shape == grad.shape == (6, 300)
    assert rel_error(jvp, grad) < RTOL_F32


def test_float32_scoring_is_at_float32_accuracy_on_a_confident_classifier() -> None:
    """On a well-fit softmax, float32 per-example gradients lose digits in ``p − 1``; both
    scoring paths then sit at that floor (~2e-6 here), not one path behind the other."""
    model, train, test = digits_mlp()
    engine = InfluenceEngine(model, train=train, batch_size=512)
    s_test = engine.gradients(test.inputs[:3], test.targets[:3])
    exact64 = InfluenceEngine(model, train=train, batch_size=512, dtype=torch.float64)
    truth = exact64.scores_from_s_test(s_test.double(), method="grad")
    for method in ("jvp", "grad"):
        assert rel_error(engine.scores_from_s_test(s_test, method=method).double(), truth) < 5e-6


def test_auto_scoring_switches_path_at_the_documented_threshold() -> None:
    assert resolve_method("auto", JVP_MAX_DIRECTIONS) == "jvp"
    assert resolve_method("auto", JVP_MAX_DIRECTIONS + 1) == "grad"
    with pytest.raises(ValueError, match="method"):
        resolve_method("fast", 1)  # type: ignore[arg-type]


def test_score_shards_concatenate_to_the_full_matrix() -> None:
    engine = _tiny_engine()
    result = engine.scores(tiny_data("classes3", 3, seed=1), Exact())
    shards = [
        engine.scores_from_s_test(result.s_test, a, b) for a, b in ((0, 7), (7, 30), (30, 40))
    ]
    assert rel_error(torch.cat(shards, dim=1), result.scores) < 1e-14
    with pytest.raises(ValueError, match="shard"):
        engine.scores_from_s_test(result.s_test, 30, 41)
    with pytest.raises(ValueError, match="s_test must have shape"):
        engine.scores_from_s_test(result.s_test[:, :5])


@functools.cache
def _tiny_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """Dense damped GNH and per-example gradients of the tiny problem (float64)."""
    model, train = tiny_mlp(3), tiny_data("classes3", 40)
    matrix = dense_gnh(model, "cross_entropy", *train, weight_decay=WEIGHT_DECAY)
    matrix += 1e-3 * torch.eye(matrix.shape[0], dtype=torch.float64)
    return matrix, loop_grads(model, "cross_entropy", *train)


@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12)], ids=["exact", "cg"])
def test_self_influence_matches_a_dense_solve(solver) -> None:
    matrix, grads = _tiny_reference()
    expected = (grads * torch.linalg.solve(matrix, grads.T).T).sum(dim=1) / 40
    assert rel_error(_tiny_engine().self_influence(solver), expected) < RTOL_SOLVE
    assert (expected > 0).all()


def test_self_influence_records_one_aggregated_report_and_warns_once() -> None:
    engine = _tiny_engine()  # N = 40 in chunks of 16: three CG solves
    assert engine.last_report is None
    engine.self_influence(CG(tol=1e-12))
    report = engine.last_report
    assert report is not None and report.method == "cg" and report.converged
    assert report.details["solves"] == 3
    assert report.iterations == max(report.details["solve_iterations"])
    assert report.relative_residual == max(report.details["solve_residuals"]) < 1e-10
    with pytest.warns(ConvergenceWarning, match="3 of 3 chunk solves") as caught:
        values = engine.self_influence(CG(tol=1e-12, max_iter=2))
    assert len([w for w in caught if w.category is ConvergenceWarning]) == 1
    assert values.shape == (40,)
    report = engine.last_report
    assert not report.converged and report.iterations == 2 and report.relative_residual > 1e-3
    assert report.to_dict()["details"]["solve_converged"] == [False] * 3
    engine.self_influence(Exact())
    report = engine.last_report
    assert report.method == "exact" and report.converged and 0 < report.relative_residual < 1e-10
    assert report.details["residual_columns"] == 40


def test_factorized_self_influence_reports_the_residual_of_its_factorization() -> None:
    """Rank-20 Lanczos on d = 57 is a rough inverse: the reported residual is the largest
    ‖(G+λI)x_j − g_j‖/‖g_j‖ over the training gradients g_j (N = 40 < the 64 sampled), with
    x_j the factorization's solution, recomputed here with the dense float64 matrix."""
    engine = _tiny_engine()
    solver = Lanczos(rank=20)
    engine.self_influence(solver)
    report = engine.last_report
    matrix, grads = _tiny_reference()
    solution, _ = solver.solve(engine.operator, grads.T)
    expected = ((matrix @ solution - grads.T).norm(dim=0) / grads.norm(dim=1)).max()
    assert 1e-3 < float(expected) < 0.1  # measured 8.6e-3
    assert report.method == "lanczos" and report.details["residual_columns"] == 40
    assert report.relative_residual == pytest.approx(float(expected), rel=1e-6)


def test_self_influence_with_lissa_estimates_the_scale_once(monkeypatch) -> None:
    calls = 0
    real = influence.solvers._extreme_curvature

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(influence.solvers, "_extreme_curvature", counting)
    engine = _tiny_engine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        engine.self_influence(LiSSA(depth=20, batch_size=16, window=10))
    assert calls == 1
    report = engine.last_report
    assert report.method == "lissa" and report.details["solves"] == 3
    assert report.details["scale"] > 0 and report.iterations <= 20


def test_lanczos_self_influence_error_against_exact_is_small_at_moderate_rank() -> None:
    model, train, _ = digits_mlp()
    engine = InfluenceEngine(model, train=train, dtype=torch.float64, weight_decay=WEIGHT_DECAY)
    exact = engine.self_influence(Exact())
    approx = {rank: engine.self_influence(Lanczos(rank=rank)) for rank in (32, 128)}
    errors = {rank: rel_error(values, exact) for rank, values in approx.items()}
    print(f"Lanczos self-influence relative error vs exact (d = {engine.num_params}): {errors}")
    assert errors[128] < errors[32]
    assert errors[128] < 0.05
    assert pearson(approx[128], exact) > 0.99


def test_group_influence_is_the_summed_loss_removal() -> None:
    engine = _tiny_engine()
    test = tiny_data("classes3", 3, seed=1)
    group = [2, 5, 11, 30]
    value, report = engine.group_influence(group, test, Exact())
    matrix, _ = _tiny_reference()
    expected = reference_scores(
        engine.model, "cross_entropy", tiny_data("classes3", 40), test, matrix
    )
    assert value.shape == (3,)
    assert rel_error(value, expected[:, group].sum(dim=1)) < RTOL_SOLVE
    assert report.relative_residual < 1e-10
    for bad, message in (([], "at least one"), ([1, 1], "repeat"), ([40], r"\[0, 40\)")):
        with pytest.raises(ValueError, match=message):
            engine.group_influence(bad, test, Exact())


def test_group_influence_sums_a_group_larger_than_one_batch() -> None:
    """A group of 10 with batch_size 4 is summed in chunks of 4, 4 and 2; every chunk must
    take its own rows (dense reference: the group's columns of the dense score matrix)."""
    engine = _tiny_engine(batch_size=4)
    test = tiny_data("classes3", 3, seed=1)
    group = [0, 3, 7, 8, 12, 19, 22, 27, 33, 39]
    value, _ = engine.group_influence(group, test, Exact())
    matrix, _ = _tiny_reference()
    expected = reference_scores(
        engine.model, "cross_entropy", tiny_data("classes3", 40), test, matrix
    )
    assert rel_error(value, expected[:, group].sum(dim=1)) < RTOL_SOLVE


def test_stream_scores_validates_its_arguments() -> None:
    engine = _tiny_engine()
    op = engine.operator
    s_test = torch.zeros(2, engine.num_params, dtype=torch.float64)

    def call(s_test=s_test, num_train=40, inputs=op.inputs, batch_size=16):
        return stream_scores(
            engine.fmodel, engine.loss, engine.theta, inputs, op.targets[: len(inputs)],
            s_test, num_train=num_train, batch_size=batch_size,
        )  # fmt: skip

    assert call().shape == (2, 40)
    for kwargs, message in (
        ({"s_test": s_test[:, :5]}, r"s_test must have shape \[k, 57\]"),
        ({"s_test": s_test[0]}, "s_test must have shape"),
        ({"s_test": s_test[:0]}, "k >= 1"),
        ({"num_train": 0}, "num_train must be"),
        ({"num_train": 10}, "exceed num_train"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=message):
            call(**kwargs)


def test_top_k_ranks_helpful_and_harmful() -> None:
    scores = torch.tensor([[0.5, -2.0, 3.0, 0.0, -0.1], [1.0, 2.0, -3.0, 4.0, -5.0]])
    ranked = top_k(scores, 2)
    assert ranked.helpful.tolist() == [[2, 0], [3, 1]]
    assert ranked.harmful.tolist() == [[1, 4], [4, 2]]
    assert ranked.helpful_scores.tolist() == [[3.0, 0.5], [4.0, 2.0]]
    assert torch.equal(ranked.harmful_scores, torch.tensor([[-2.0, -0.1], [-5.0, -3.0]]))
    assert top_k(scores, 10).helpful.shape == (2, 5)
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, 0)


def test_engine_accepts_a_dataset_and_leaves_the_model_untouched() -> None:
    model, train, test = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = InfluenceEngine(model, train=train, dtype=torch.float64)
    assert engine.num_train == len(train) and engine.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = engine.scores(test.subset([0, 1]), Exact())
    assert result.scores.dtype == torch.float64 and result.scores.shape == (2, len(train))


@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12)], ids=["exact", "cg"])
def test_top_k_rankings_match_an_independent_dense_reference(solver) -> None:
    """The ranked helpful/harmful lists equal the argsort of scores from a dense float64
    solve with a jacrev/hessian-built GNH (not the engine's products)."""
    engine = _tiny_engine()
    test = tiny_data("classes3", 3, seed=1)
    matrix, _ = _tiny_reference()
    expected = reference_scores(
        engine.model, "cross_entropy", tiny_data("classes3", 40), test, matrix
    )
    ranked = engine.scores(test, solver).top_k(5)
    order = expected.argsort(dim=1, descending=True)
    assert ranked.helpful.tolist() == order[:, :5].tolist()
    assert ranked.harmful.tolist() == order.flip(1)[:, :5].tolist()
    torch.testing.assert_close(ranked.helpful_scores, expected.gather(1, order[:, :5]))
    ascending = expected.argsort(dim=1)
    torch.testing.assert_close(ranked.harmful_scores, expected.gather(1, ascending[:, :5]))
    assert (ranked.harmful_scores < 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": None}, "train is required"),
        (
            {"train": (torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))},
            "4 inputs and 3 targets",
        ),
        ({"train": (torch.full((4, 5), float("nan")), torch.zeros(4, dtype=torch.long))}, "NaN"),
        (
            {"train": (torch.zeros(4, 5), torch.full((4, 3), float("nan"))), "loss": "mse"},
            "targets contain NaN",
        ),
        ({"train": [1, 2, 3]}, "pair or a Dataset"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"hessian": "diag"}, "hessian"),
        ({"damping": -1.0}, "damping"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_bad_engine_arguments_name_the_problem(kwargs: dict, message: str) -> None:
    options = {"train": tiny_data("classes3", 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        InfluenceEngine(tiny_mlp(3), **options)


def test_a_model_with_non_finite_parameters_is_refused() -> None:
    model = tiny_mlp(3)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model parameters contain NaN or infinite"):
        InfluenceEngine(model, train=tiny_data("classes3", 4))


def test_progress_reaches_one_and_a_raising_callback_aborts() -> None:
    engine = _tiny_engine()
    seen: list[tuple[float, str]] = []
    engine.scores(
        tiny_data("classes3", 2, seed=1), CG(tol=1e-8), progress=lambda f, p: seen.append((f, p))
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p for _, p in seen} == {"solve", "score"}

    class Cancelled(Exception):
        pass

    def cancel(fraction: float, phase: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        engine.self_influence(Exact(), progress=cancel)


# ----------------------------------------------------------------------------- LOO


def _fit(train: models.Dataset, recipe: models.Recipe, config: dict, **kwargs) -> torch.nn.Module:
    run = models.train(config, train, recipe, dtype=torch.float64, **kwargs)
    return run.model()


def test_predicted_test_loss_changes_match_leave_one_out_retraining() -> None:
    """Logistic regression on breast cancer, wd 0.01: influence vs actual LOO retraining."""
    train = models.builtin_dataset("breast_cancer", "train")
    test = models.builtin_dataset("breast_cancer", "test")
    config = {"architecture": "logistic_regression", "in_features": 30, "num_classes": 2}
    recipe = models.Recipe(
        optimizer="lbfgs", lr=1.0, epochs=30, weight_decay=WEIGHT_DECAY, loss="bce",
        lbfgs_max_iter=100, lbfgs_tolerance_grad=1e-14, lbfgs_tolerance_change=1e-20,
    )  # fmt: skip
    base = _fit(train, recipe, config)
    engine = InfluenceEngine(
        base, loss="bce", train=train, weight_decay=WEIGHT_DECAY, damping=0.0, dtype=torch.float64
    )

    def gradient_norm(model: torch.nn.Module, weights: torch.Tensor) -> float:
        probe = InfluenceEngine(model, loss="bce", train=train, dtype=torch.float64)
        grads = probe.gradients(train.inputs, train.targets)
        return float((weights @ grads / len(train) + WEIGHT_DECAY * probe.theta).norm())

    n = len(train)
    norms = [gradient_norm(base, torch.ones(n, dtype=torch.float64))]
    queries = (test.inputs[:10], test.targets[:10])
    predicted = engine.scores(queries, Exact()).scores  # [10 test, N]
    removed = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20]
    loss = engine.loss
    with torch.no_grad():
        base_test_loss = loss.per_example(engine.model(queries[0].double()), queries[1])
    actual = torch.empty(10, len(removed), dtype=torch.float64)
    for j, i in enumerate(removed.tolist()):
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0.0
        retrained = _fit(train, recipe, config, example_weights=weights, init=base.state_dict())
        norms.append(gradient_norm(retrained, weights))
        with torch.no_grad():
            test_loss = loss.per_example(retrained(queries[0].double()), queries[1])
        actual[:, j] = test_loss - base_test_loss
    correlation = pearson(predicted[:, removed], actual)
    print(f"LOO vs influence (breast cancer, 20 x 10): Pearson {correlation:.5f}, ", end="")
    print(f"largest objective gradient norm {max(norms):.1e}")
    assert max(norms) < 1e-8  # converged to float64's floor: the retraining is not noise
    assert correlation >= 0.99
