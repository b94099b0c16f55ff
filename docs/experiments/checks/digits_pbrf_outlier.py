"""Why one removed point dominates digits_mlp64's PBRF-vs-influence correlation.

For each training index given (default 651, the outlier, and 1059): the influence solve's
residual, the removal leverage ρ (``Responder.removal_leverage``), the PBRF solve's final
gradient norm and what 75 more L-BFGS steps change, the linearized PBRF by L-BFGS against
its closed form, and the PBRF at ε = s/N (continued from the previous s, and from θˢ).
Slope = least-squares slope of actual on influence-predicted test-loss changes on the
correlation's 20 test points. Run from the repository root (about 5 minutes a point):

    OMP_NUM_THREADS=1 .venv/bin/python docs/experiments/checks/digits_pbrf_outlier.py 651
"""

import sys
from pathlib import Path

import torch
from torch.func import grad, jvp

from influence.experiments.config import ExperimentConfig
from influence.response import Responder

torch.set_num_threads(1)
config = ExperimentConfig.load(Path(__file__).parents[3] / "influence/configs/digits_mlp64.json")
train_set, test_set = config.datasets()
r = Responder.from_run(config.train_base(train_set), train_set, config.response)
gen = torch.Generator().manual_seed(config.correlation.seed)
torch.randperm(r.n, generator=gen)  # the removed points' draw, as in correlate()
tests = torch.randperm(len(test_set), generator=gen)[: config.correlation.num_test]
xq, tq = test_set.inputs[tests], test_set.targets[tests]


def lbfgs(objective, start, outer):
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-16)  # fmt: skip

    def closure():
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    for _ in range(outer):
        opt.step(closure)
    theta = theta.detach()
    return theta, float(grad(objective)(theta).norm())


def slope(predicted, theta):
    actual = r.losses(theta, xq, tq) - r.losses(r.theta_s, xq, tq)
    return float(predicted @ actual / (predicted @ predicted))


for z in [int(a) for a in sys.argv[1:]] or [651, 1059]:
    problem = r.problem([z])
    eps = problem.epsilon
    p = problem.outputs(r.theta_s, torch.tensor([z]))[0].softmax(-1)
    label = int(r.targets[z])
    print(
        f"\n=== train index {z}: label {label}, p(label) {float(p[label]):.3f}, "
        f"loss {float(problem.removed_loss(r.theta_s)):.3f}, "
        f"|∇L_z| {float(problem.removed_gradient.norm()):.2f}"
    )
    theta_inf, report = r.influence([[z]])
    step = theta_inf[0] - r.theta_s
    predicted = r.predicted_changes(theta_inf, xq, tq)[0]
    u = step / step.norm()
    own = float(u @ jvp(grad(problem.removed_loss), (r.theta_s,), (u,))[1])
    damped = float(u @ r.engine.operator.matvec(u))
    rho = float(r.removal_leverage([[z]], theta_inf)[0])
    print(
        f"influence: {report.iterations} CG iterations, relative residual "
        f"{report.relative_residual:.1e}; along u: uᵀ(G+λI)u = {damped:.3e}, "
        f"ε uᵀ∇²L_z u = {eps * own:.3e}; ρ = {rho:.3f}, 1/(1−ρ) = {1 / (1 - rho):.2f}"
    )
    theta_pbrf = r.retrain("pbrf", [z])
    g = float(grad(problem.pbrf)(theta_pbrf).norm())
    print(
        f"PBRF as configured: |∇ objective| {g:.1e}, |θ − θˢ| "
        f"{float((theta_pbrf - r.theta_s).norm()):.3f} (influence {float(step.norm()):.3f}), "
        f"slope {slope(predicted, theta_pbrf):.4f}"
    )
    more, g_more = lbfgs(problem.pbrf, theta_pbrf, 75)
    moved = float((more - theta_pbrf).norm())
    print(
        f"  75 more L-BFGS steps: |∇| {g_more:.1e}, moved {moved:.1e}, "
        f"objective {float(problem.pbrf(theta_pbrf)):.9e} → {float(problem.pbrf(more)):.9e}, "
        f"slope {slope(predicted, more):.4f}"
    )
    lin = r.retrain("linearized", [z])
    print(
        f"linearized PBRF by L-BFGS vs closed form: relative difference "
        f"{float((lin - theta_inf[0]).norm() / step.norm()):.1e}"
    )
    previous = r.theta_s
    for s in (0.125, 0.25, 0.5, 1.0):
        scaled = r.problem([z], epsilon=s * eps)
        continued, g_c = lbfgs(scaled.pbrf, previous, 40)
        direct, _ = lbfgs(scaled.pbrf, r.theta_s, 40)
        diff = float((continued - direct).norm() / (continued - r.theta_s).norm())
        print(
            f"  ε = {s}/N: slope {slope(s * predicted, continued):.3f}, |∇| {g_c:.1e}, "
            f"continued vs from θˢ: relative difference {diff:.1e}, objectives "
            f"{float(scaled.pbrf(continued)):.9e} / {float(scaled.pbrf(direct)):.9e}"
        )
        previous = continued
