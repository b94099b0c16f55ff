"""Response functions by retraining (models.train) against dense float64 closed forms."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.func import jacrev

import influence.decomposition
import influence.response
from influence.decomposition import (
    DecompositionArguments,
    compute_responses,
    decompose,
    first_order_proximity,
    sample_removed,
)
from influence.response import (
    Responder,
    ResponseArguments,
    VerifyArguments,
    output_distance,
    verify,
)
from influence.solvers import CG, Exact
from models import (
    Dataset,
    Recipe,
    TrainingError,
    build,
    builtin_dataset,
    save_checkpoint,
    train,
)
from tests.conftest import RTOL_SOLVE
from tests.influence.problems import dense_gnh, dense_hessian, reference_scores

LR_CONFIG = {"architecture": "logistic_regression", "in_features": 3, "num_classes": 2}
LR_RECIPE = Recipe(
    optimizer="lbfgs", lr=1.0, epochs=6, weight_decay=0.01, loss="bce",
    lbfgs_max_iter=100, lbfgs_tolerance_grad=1e-13, lbfgs_tolerance_change=0.0,
)  # fmt: skip
MLP_CONFIG = {"architecture": "mlp", "in_features": 3, "out_features": 3, "hidden": [5]}


def _classification(n: int, classes: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    t = ((x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(n, generator=gen)) > 0).long()
    if classes > 2:
        t = t + (x[:, 2] > 0.5).long()
    meta = {"name": "toy", "task": "classification", "num_classes": classes}
    return Dataset(x, t, {**meta, "class_names": [str(c) for c in range(classes)]})


@pytest.fixture(scope="module")
def logreg() -> Responder:
    data = _classification(40, 2, seed=0)
    run = train(LR_CONFIG, data, LR_RECIPE, dtype=torch.float64)
    return Responder.from_run(run, data, ResponseArguments(damping=1e-3))


def _closed_form_proximity(r: Responder, removed: list[int]) -> float:
    """``‖J[H_Q⁻¹ − (H_Q+λI)⁻¹] ε∇L_z‖`` with dense J (output Jacobian) and H_Q (Hessian
    of the down-weighted cost Q, by ``torch.func.hessian``)."""
    p = r.problem(removed)
    d = r.theta_s.numel()
    h = torch.func.hessian(p.downweighted)(r.theta_s)
    jac = jacrev(r.fmodel, argnums=0)(r.theta_s, r.inputs).reshape(r.n, d)
    g = p.epsilon * p.removed_gradient
    damped = h + r.arguments.damping * torch.eye(d, dtype=h.dtype)
    return float((jac @ (torch.linalg.solve(h, g) - torch.linalg.solve(damped, g))).norm())


def test_converged_logistic_regression_gaps(logreg: Responder) -> None:
    removed = [3]
    th = {m: logreg.retrain(m, removed) for m in ("cold", "warm", "proximal", "pbrf", "linearized")}
    th["influence"] = logreg.influence([removed])[0][0]
    out = {m: logreg.outputs(t) for m, t in th.items()}
    moved = output_distance(out["warm"], logreg.outputs(logreg.theta_s))
    assert moved > 1e-2  # removal does something measurable
    for a, b in (("cold", "warm"), ("proximal", "pbrf"), ("linearized", "influence")):
        assert output_distance(out[a], out[b]) < 1e-6 * max(1.0, moved), (a, b)
    proximity = output_distance(out["warm"], out["proximal"])
    assert proximity == pytest.approx(_closed_form_proximity(logreg, removed), rel=0.1)


def test_proximity_gap_matches_closed_form_to_first_order(logreg: Responder) -> None:
    # The closed form is first order in ε; with N = 40, ε = 1/N is far from small.
    r = Responder(
        logreg.config, logreg.fmodel.unflatten(logreg.theta_s), logreg.recipe,
        logreg.dataset, ResponseArguments(epsilon=0.05 / 40),
    )  # fmt: skip
    gap = output_distance(r.outputs(r.retrain("warm", [3])), r.outputs(r.retrain("proximal", [3])))
    dense = _closed_form_proximity(r, [3])
    assert gap == pytest.approx(dense, rel=0.01)
    assert first_order_proximity(r, [[3]])[0] == pytest.approx(dense, rel=RTOL_SOLVE)


def test_first_order_proximity_uses_the_true_hessian(logreg: Responder, monkeypatch) -> None:
    """Warm and proximal minimise the true objectives, so the closed form takes the full
    Hessian even when the responder's influence uses the Gauss-Newton one."""
    kinds: list[str] = []
    real = influence.decomposition.DampedCurvature

    def spy(*args, **kwargs):
        kinds.append(kwargs["kind"])
        return real(*args, **kwargs)

    monkeypatch.setattr(influence.decomposition, "DampedCurvature", spy)
    assert logreg.arguments.hessian == "gnh"
    value = first_order_proximity(logreg, [[3]])[0]
    assert kinds and set(kinds) == {"full"}
    assert value == pytest.approx(_closed_form_proximity(logreg, [3]), rel=RTOL_SOLVE)


def test_cold_start_replays_the_base_schedule_over_k_epochs(monkeypatch) -> None:
    data = _classification(30, 3, seed=2)
    recipe = Recipe(optimizer="sgd", lr=0.1, epochs=4, batch_size=8, schedule="cosine")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    calls: list[dict] = []
    real = influence.response.train

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(influence.response, "train", spy)
    Responder.from_run(run, data).retrain("cold", [4])
    assert calls[-1]["epochs"] == 4 + 2 and calls[-1]["schedule_epochs"] == 4


def test_linearization_gap_is_second_order_in_epsilon(logreg: Responder) -> None:
    gaps = []
    for eps in (1.0 / 40, 0.1 / 40):
        r = Responder(
            logreg.config, logreg.fmodel.unflatten(logreg.theta_s), logreg.recipe,
            logreg.dataset, ResponseArguments(epsilon=eps),
        )  # fmt: skip
        pbrf, lin = r.retrain("pbrf", [3]), r.retrain("linearized", [3])
        gaps.append(output_distance(r.outputs(pbrf), r.outputs(lin)))
    assert gaps[1] / gaps[0] == pytest.approx(0.01, rel=0.3)


def test_removal_leverage_is_sherman_morrison_for_linear_regression() -> None:
    # Linear model + squared error: PBRF is exactly quadratic with Hessian G + λI − ε x̃x̃ᵀ,
    # so its step is the influence step / (1 − ρ), ρ = ε x̃ᵀ(G+λI)⁻¹x̃ (z's leverage).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    x[7] = torch.tensor([6.0, -5.0, 4.0], dtype=torch.float64)  # a high-leverage point
    t = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 3.0
    data = Dataset(x, t, {"name": "toy", "task": "regression"})
    config = {"architecture": "mlp", "in_features": 3, "out_features": 1, "hidden": []}
    recipe = replace(LR_RECIPE, loss="mse", epochs=3)
    run = train(config, data, recipe, dtype=torch.float64)
    r = Responder.from_run(run, data, ResponseArguments(damping=1e-3))
    z = [7]
    theta_inf = r.influence([z])[0]
    rho = float(r.removal_leverage([z], theta_inf)[0])
    xt = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], dim=1)  # (weight, bias) order
    g = xt.T @ xt / 30 + (recipe.weight_decay + 1e-3) * torch.eye(4, dtype=torch.float64)
    leverage = float(xt[7] @ torch.linalg.solve(g, xt[7])) / 30
    assert rho == pytest.approx(leverage, rel=RTOL_SOLVE)
    assert 0.3 < rho < 1  # a large effect, not a vacuous check
    step = r.retrain("pbrf", z) - r.theta_s
    assert torch.allclose(step, (theta_inf[0] - r.theta_s) / (1 - rho), rtol=1e-6, atol=1e-10)


def test_two_stage_equals_warm_when_converged(logreg: Responder) -> None:
    warm, two = logreg.retrain("warm", [5]), logreg.retrain("two_stage", [5])
    assert output_distance(logreg.outputs(warm), logreg.outputs(two)) < 1e-6


def test_linearized_pbrf_by_sgd_approaches_closed_form() -> None:
    data = _classification(30, 3, seed=1)
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=20, batch_size=None, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    gaps = []
    for epochs in (6, 24, 96):
        r = Responder.from_run(
            run, data, ResponseArguments(epochs=epochs, damping=0.05, pbrf_lr_factor=1.0)
        )
        closed = r.influence([[2]])[0][0]
        lin = r.retrain("linearized", [2])
        gaps.append(output_distance(r.outputs(lin), r.outputs(closed)))
    assert gaps[1] < 0.5 * gaps[0]
    assert gaps[2] < 0.5 * gaps[1]


def test_retraining_is_deterministic_and_runs_the_recipes_minibatches(monkeypatch) -> None:
    """Every retraining optimises its objective on minibatches of the recipe's batch size
    (consecutive slices of one shuffled permutation per epoch; cold start replays the
    recorded orders for its first K epochs), and retraining twice gives identical θ."""
    data = _classification(30, 3, seed=2)
    recipe = Recipe(optimizer="sgdm", lr=0.05, epochs=4, batch_size=8, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    # recorded orders that differ from those the recipe's seed draws, so replay shows
    recorded = [order.flip(0) for order in run.batch_order]
    r = Responder(MLP_CONFIG, run.thetas, recipe, data, theta0=run.theta0, batch_order=recorded)
    calls: list[list[list[int]]] = []  # per models.train call: the objective's idx, in order
    real = influence.response.train

    def spy(*args, **kwargs):
        objective, seen = kwargs["objective"], []
        calls.append(seen)

        def recording(model, x, t, idx):
            seen.append(idx.tolist())
            return objective(model, x, t, idx)

        return real(*args, **{**kwargs, "objective": recording})

    monkeypatch.setattr(influence.response, "train", spy)
    for method in ("cold", "warm", "proximal", "pbrf", "linearized", "two_stage"):
        calls.clear()
        assert torch.equal(r.retrain(method, [4]), r.retrain(method, [4])), method
        epochs = 4 + 2 if method == "cold" else 2  # K + K/2, or K/2 from θˢ
        # two_stage trains warm(D) once (cached) and warm(D − z) on each call
        assert len(calls) == (3 if method == "two_stage" else 2), method
        for seen in calls:
            assert [len(idx) for idx in seen] == [8, 8, 8, 6] * epochs, method
            orders = [[i for idx in seen[4 * e : 4 * e + 4] for i in idx] for e in range(epochs)]
            assert all(sorted(o) == list(range(30)) for o in orders), method
            assert any(o != list(range(30)) for o in orders), method  # shuffled
            if method == "cold":
                assert orders[:4] == [o.tolist() for o in recorded], method


def test_decompose_checkpoint_mode_and_serialisation(logreg: Responder) -> None:
    plain = Responder(
        logreg.config, logreg.fmodel.unflatten(logreg.theta_s), logreg.recipe, logreg.dataset
    )
    assert not plain.has_history
    with pytest.raises(ValueError, match="cold start"):
        plain.retrain("cold", [0])
    result = decompose(plain, DecompositionArguments(num_points=2, seed=3))
    assert list(result.gaps) == ["proximity", "non_convergence", "linearization", "solver"]
    assert result.removed == sample_removed(40, DecompositionArguments(num_points=2, seed=3))
    summary = json.loads(json.dumps(result.to_dict()))["summary"]
    assert summary["proximity"]["rms_mean"] == pytest.approx(summary["proximity"]["mean"] / 40**0.5)
    assert "| proximity |" in result.markdown()


def test_sample_removed_groups_and_errors() -> None:
    groups = sample_removed(50, DecompositionArguments(num_points=3, group_fraction=0.2))
    assert [len(g) for g in groups] == [10, 10, 10]
    assert all(len(set(g)) == 10 for g in groups)
    with pytest.raises(ValueError, match="num_points"):
        sample_removed(5, DecompositionArguments(num_points=6))
    with pytest.raises(ValueError, match="group_fraction"):
        DecompositionArguments(group_fraction=1.5)
    with pytest.raises(ValueError, match="solver"):
        ResponseArguments(solver="magic")


def test_verify_pbrf_tracks_influence(tmp_path) -> None:
    data = _classification(40, 3, seed=4)
    test = _classification(10, 3, seed=5)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=30, batch_size=None, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, run.model(), MLP_CONFIG)
    small = VerifyArguments(epsilon=1e-3, steps=4, solver="exact")
    result = verify(path, data, test, [0, 7, 12, 30], damping=1e-2, arguments=small)
    assert result.predicted.shape == result.actual.shape == (4, 10)
    assert result.correlation["pearson"] > 0.95
    assert json.loads(json.dumps(result.to_dict()))["method"] == "pbrf"
    with pytest.raises(ValueError, match="method"):
        verify(path, data, test, [0], method="cold")


def test_verify_takes_the_query_hessian_and_a_solver_object() -> None:
    data = _classification(40, 3, seed=4)
    test = _classification(6, 3, seed=5)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=30, batch_size=None, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    model, indices = run.model(), [0, 7, 12]
    result = verify(
        (model, MLP_CONFIG), data, test, indices, damping=0.1, hessian="full",
        method="linearized", solver=CG(tol=1e-11, max_iter=300),
        arguments=VerifyArguments(epsilon=1e-3, steps=2, solver="exact"),
    )  # fmt: skip
    assert result.report["method"] == "cg" and result.report["details"]["tol"] == 1e-11

    def predicted(hessian: str) -> torch.Tensor:
        arguments = ResponseArguments(epsilon=1e-3, damping=0.1, hessian=hessian)
        r = Responder(MLP_CONFIG, model.state_dict(), recipe, data, arguments, solver=Exact())
        influence_thetas, _ = r.influence([[i] for i in indices])
        return r.predicted_changes(influence_thetas, test.inputs, test.targets)

    torch.testing.assert_close(result.predicted, predicted("full"), rtol=1e-8, atol=1e-12)
    assert not torch.allclose(result.predicted, predicted("gnh"), rtol=1e-3)


@pytest.mark.parametrize("hessian", ["gnh", "full"])
def test_verify_predicted_is_the_dense_influence_score(hessian: str) -> None:
    """With ε = 1/N, ``predicted[k, t]`` is ``(1/N) ∇L_tᵀ (G+λI)⁻¹ ∇L_i`` for i =
    ``train_indices[k]`` (docs/engine.md's score: the predicted change of test loss t
    when i is removed), G the dense float64 Gauss-Newton matrix or Hessian with wd·I;
    with another ε it scales by ε·N."""
    data = _classification(40, 3, seed=4)
    test = _classification(6, 3, seed=5)
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=30, batch_size=None, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    model, indices, damping, wd = run.model(), [0, 7, 12, 31], 0.05, 0.02
    train_xy = (data.inputs.double(), data.targets)
    dense = (dense_gnh if hessian == "gnh" else dense_hessian)(
        model, "cross_entropy", *train_xy, wd
    )
    matrix = dense + damping * torch.eye(len(dense), dtype=torch.float64)
    ref = reference_scores(
        model, "cross_entropy", train_xy, (test.inputs.double(), test.targets), matrix
    )[:, indices].T  # [k, T]
    assert ref.abs().min() > 1e-6  # every entry a real comparison, not a zero

    def predicted(epsilon: float | None) -> torch.Tensor:
        small = VerifyArguments(epsilon=epsilon, steps=1, solver="exact")
        return verify((model, MLP_CONFIG), data, test, indices, damping=damping,
                      weight_decay=wd, hessian=hessian, method="linearized",
                      arguments=small).predicted  # fmt: skip

    torch.testing.assert_close(predicted(None), ref, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(predicted(1e-3), ref * 1e-3 * 40, rtol=1e-8, atol=0.0)


def test_verify_retrains_points_whose_removal_barely_changes_the_objective() -> None:
    """Well-fit points of a converged logistic regression: removing one changes the PBRF
    objective by ~1e-12, under L-BFGS's default tolerance_change (1e-9), which used to
    stop the retraining at θˢ and report an actual change of exactly 0. Their leverage is
    small, so the PBRF's change matches influence's prediction closely."""
    data = builtin_dataset("breast_cancer").subset(torch.arange(60))
    test = builtin_dataset("breast_cancer").subset(torch.arange(60, 63))
    config = {"architecture": "logistic_regression", "in_features": 30, "num_classes": 2}
    recipe = Recipe(
        optimizer="lbfgs", epochs=10, weight_decay=0.01, loss="bce", lbfgs_max_iter=100,
        lbfgs_tolerance_grad=1e-14, lbfgs_tolerance_change=0,
    )  # fmt: skip
    model = train(config, data, recipe, dtype=torch.float64).model()
    well_fit = [2, 6, 9]  # training losses 5e-7 .. 1.2e-4
    result = verify((model, config), data, test, well_fit, loss="bce", weight_decay=0.01)
    assert result.predicted.abs().min() > 1e-11
    torch.testing.assert_close(result.actual, result.predicted, rtol=0.03, atol=0.0)


def test_decomposition_gaps_compare_the_documented_pairs() -> None:
    """Gap j of each removed set is d(a, b) of the two responses docs/experiments/README.md
    (Table 5) names, each recomputed here by ``Responder.retrain`` / ``influence``."""
    pairs = {
        "warm_start": ("cold", "warm"),
        "proximity": ("warm", "proximal"),
        "non_convergence": ("proximal", "pbrf"),
        "linearization": ("pbrf", "linearized"),
        "solver": ("linearized", "influence"),
    }
    data = _classification(20, 3, seed=6)
    recipe = Recipe(optimizer="sgd", lr=0.3, epochs=4, batch_size=8, loss="cross_entropy")
    run = train(MLP_CONFIG, data, recipe, dtype=torch.float64)
    r = Responder.from_run(run, data, ResponseArguments(damping=0.05))
    result = decompose(r, DecompositionArguments(num_points=2, seed=1))
    assert list(result.gaps) == list(pairs)
    for j, z in enumerate(result.removed):
        theta = {m: r.retrain(m, z) for m in ("cold", "warm", "proximal", "pbrf", "linearized")}
        theta["influence"] = r.influence([z])[0][0]
        out = {m: r.outputs(t) for m, t in theta.items()}
        for name, (a, b) in pairs.items():
            expected = output_distance(out[a], out[b])
            assert expected > 1e-8, (name, z)  # a real distance, not two equal responses
            assert result.gaps[name][j] == pytest.approx(expected, rel=1e-9), (name, z)


def test_unbounded_pbrf_is_reported_clearly() -> None:
    # ReLU + cross-entropy: the removed point's loss terms cancel to a term linear in its
    # logits, which grow quadratically in θ and can beat (λ/2)‖θ−θˢ‖² for small λ.
    config = {"architecture": "mlp", "in_features": 4, "out_features": 3, "hidden": [6]}
    torch.manual_seed(0)
    model = build(config)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(41, 4, generator=gen), torch.randint(0, 3, (41,), generator=gen)
    data = Dataset(x[:40], t[:40], {"task": "classification", "num_classes": 3})
    test = Dataset(x[40:], t[40:])
    with pytest.raises(TrainingError, match=r"pbrf response diverged.*raise damping"):
        verify((model, config), data, test, [5], damping=1e-2, method="pbrf",
               arguments=VerifyArguments(epsilon=0.5, steps=20, solver="exact"))  # fmt: skip


def test_retraining_reports_progress_within_each_response(logreg: Responder) -> None:
    """Progress runs through every L-BFGS evaluation of each retraining (so a job can be
    stopped inside one), monotone, under the phase of the response being trained."""
    calls: list[tuple[float, str]] = []
    methods = ["warm", "pbrf", "two_stage"]
    compute_responses(logreg, [[0], [5]], methods, lambda f, p: calls.append((f, p)))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p for _, p in calls} == {f"retrain:{m}" for m in methods}
    first = [f for f, p in calls if 0 < f < 1 / 6]  # inside the first of six retrainings
    assert len(first) >= 5 and {p for f, p in calls if f < 1 / 6} == {"retrain:warm"}

    def stop(fraction: float, phase: str) -> None:
        if fraction > 0:
            raise KeyboardInterrupt(phase)

    with pytest.raises(KeyboardInterrupt, match="retrain:warm"):
        compute_responses(logreg, [[0]], ["warm"], stop)
