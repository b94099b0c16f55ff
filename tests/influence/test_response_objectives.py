"""Response objectives against written-out formulas and dense float64 closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

from influence.response import ResponseProblem, bregman_divergence, live_parameters
from models.losses import get_loss
from tests.conftest import RTOL_EXACT, RTOL_SOLVE

WD, LAM = 0.01, 1e-3


@pytest.fixture
def problem() -> ResponseProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    t = torch.randint(0, 3, (12,))
    return ResponseProblem(model, x, t, "cross_entropy", [2, 7], weight_decay=WD, damping=LAM)


def _written_ce(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=1) - logits.gather(1, t[:, None]).squeeze(1)


def _perturbed(problem: ResponseProblem, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(problem.theta_s.shape, generator=gen, dtype=torch.float64)
    return problem.theta_s + scale * noise


def _written_objectives(problem: ResponseProblem) -> dict:
    """The objectives of the response table (docs/experiments/README.md) spelled out with
    plain tensor algebra."""
    t, z, eps = problem.targets, problem.removed, problem.epsilon
    ts = problem.theta_s

    def f(theta: torch.Tensor) -> torch.Tensor:
        return problem.outputs(theta)

    def q(theta):
        losses = _written_ce(f(theta), t)
        return losses.mean() + WD / 2 * theta @ theta - eps * losses[z].sum()

    def pbrf(theta):
        y, ys = f(theta), f(ts).detach()
        ps = torch.softmax(ys, dim=1)
        onehot = torch.eye(3, dtype=y.dtype)[t]
        breg = _written_ce(y, t) - _written_ce(ys, t) - ((ps - onehot) * (y - ys)).sum(1)
        d = theta - ts
        return breg.mean() - eps * _written_ce(y[z], t[z]).sum() + (WD + LAM) / 2 * d @ d

    return {
        "downweighted": q,
        "proximal": lambda th: q(th) + LAM / 2 * (th - ts) @ (th - ts),
        "pbrf": pbrf,
    }


@pytest.mark.parametrize("name", ["downweighted", "proximal", "pbrf"])
def test_objective_gradient_matches_written_formula(problem: ResponseProblem, name: str) -> None:
    theta = _perturbed(problem).requires_grad_(True)
    written = _written_objectives(problem)[name](theta)
    (expected,) = torch.autograd.grad(written, theta)
    ours = getattr(problem, name)
    assert torch.allclose(ours(theta.detach()), written.detach(), rtol=RTOL_EXACT, atol=0)
    assert torch.allclose(grad(ours)(theta.detach()), expected, rtol=RTOL_EXACT, atol=1e-14)


def _dense_gnh(problem: ResponseProblem) -> torch.Tensor:
    """``(1/N) Σ J_iᵀ (diag(p) − ppᵀ) J_i`` from dense Jacobians."""
    jac = jacrev(problem.outputs)(problem.theta_s)  # [N, C, d]
    p = torch.softmax(problem.outputs_s, dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncd,nce,nef->df", jac, h, jac) / problem.n


def test_linearized_pbrf_gradient_and_closed_form(problem: ResponseProblem) -> None:
    d = problem.theta_s.numel()
    g_damped = _dense_gnh(problem) + (WD + LAM) * torch.eye(d, dtype=torch.float64)
    gz = sum(
        grad(lambda th, i=i: _written_ce(problem.outputs(th)[[i]], problem.targets[[i]]).sum())(
            problem.theta_s
        )
        for i in problem.removed.tolist()
    )
    theta = _perturbed(problem)
    expected = g_damped @ (theta - problem.theta_s) - problem.epsilon * gz
    assert torch.allclose(
        grad(problem.linearized_pbrf)(theta), expected, rtol=RTOL_SOLVE, atol=1e-14
    )
    closed = problem.theta_s + problem.epsilon * torch.linalg.solve(g_damped, gz)
    assert grad(problem.linearized_pbrf)(closed).norm() < 1e-12


def test_pbrf_gradient_at_theta_s_is_removed_gradient(problem: ResponseProblem) -> None:
    # The Bregman and proximity terms are stationary at θˢ: only −ε Σ_z ∇L_z remains.
    g = grad(problem.pbrf)(problem.theta_s)
    assert torch.allclose(g, -problem.epsilon * problem.removed_gradient, rtol=RTOL_EXACT)


def _lbfgs_minimum(objective, start: torch.Tensor) -> torch.Tensor:
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


def test_pbrf_optimum_tends_to_theta_s_as_epsilon_vanishes(problem: ResponseProblem) -> None:
    d = problem.theta_s.numel()
    g_damped = _dense_gnh(problem) + (WD + LAM) * torch.eye(d, dtype=torch.float64)
    derivative = torch.linalg.solve(g_damped, problem.removed_gradient)
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):
        p = ResponseProblem(
            problem.model,
            problem.inputs,
            problem.targets,
            "cross_entropy",
            problem.removed,
            epsilon=eps,
            weight_decay=WD,
            damping=LAM,
        )
        delta = _lbfgs_minimum(p.pbrf, p.theta_s) - p.theta_s
        errors.append(float((delta / eps - derivative).norm() / derivative.norm()))
    # θ(ε) = θˢ + ε (G+λI)⁻¹ Σ_z ∇L_z + O(ε²): PBRF → θˢ, with the influence slope (Eqn 46).
    assert errors[2] < 1e-3
    assert errors[1] < 0.2 * errors[0]


def test_bregman_divergence_properties() -> None:
    torch.manual_seed(0)
    for name, t in (
        ("cross_entropy", torch.randint(0, 4, (6,))),
        ("mse", torch.randn(6, 4, dtype=torch.float64)),
        ("bce", torch.randint(0, 2, (6, 4)).double()),
    ):
        loss = get_loss(name)
        ys = torch.randn(6, 4, dtype=torch.float64)
        y = ys + 0.3 * torch.randn(6, 4, dtype=torch.float64)
        div = bregman_divergence(loss, y, ys, t)
        assert div.shape == (6,)
        assert (div >= 0).all()
        assert bregman_divergence(loss, ys, ys, t).abs().max() < 1e-15
    mse = bregman_divergence(get_loss("mse"), y, ys, torch.randn(6, 4, dtype=torch.float64))
    assert torch.allclose(mse, 0.5 * (y - ys).pow(2).sum(1), rtol=RTOL_EXACT)


def test_problem_rejects_bad_input(problem: ResponseProblem) -> None:
    with pytest.raises(ValueError, match="removed"):
        ResponseProblem(problem.model, problem.inputs, problem.targets, "mse", [99])
    with pytest.raises(ValueError, match="damping"):
        ResponseProblem(problem.model, problem.inputs, problem.targets, "mse", [0], damping=-1)
    with pytest.raises(ValueError, match="targets"):
        ResponseProblem(problem.model, problem.inputs, problem.targets[:3], "mse", [0])
    with pytest.raises(ValueError, match="unknown loss"):
        ResponseProblem(problem.model, problem.inputs, problem.targets, "hinge", [0])
    assert live_parameters(problem.model).numel() == problem.theta_s.numel()
