"""Independent float64 check of the logistic-regression decomposition (cancer_logreg.json).

NumPy only: Newton's method for θˢ, warm (Q), proximal and PBRF; dense solves for the
linearized PBRF and the proximity closed form (with the Hessian of Q); the bias is
regularised like the weights.
Prints each point's leverage, gaps, a second-order prediction of the linearization gap,
its ε scaling and the proximity ratio against ε. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python docs/experiments/checks/cancer_logreg_newton.py
"""

import json
from pathlib import Path

import numpy as np

from models import builtin_dataset

ROOT = Path(__file__).parents[3]
data = builtin_dataset("breast_cancer")
x0, y = data.inputs.double().numpy(), data.targets.double().numpy()
n = len(y)
x = np.hstack([x0, np.ones((n, 1))])
d = x.shape[1]
wd, lam = 0.01, 1e-3
print(f"standardised features: min {x0.min():.2f}, max {x0.max():.2f}")


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def newton(gradient_hessian, theta):
    for _ in range(100):
        g, h = gradient_hessian(theta)
        if np.linalg.norm(g) < 1e-15:
            break
        theta = theta - np.linalg.solve(h, g)
    return theta, np.linalg.norm(gradient_hessian(theta)[0])


def downweighted(theta, eps=0.0, z=None, prox=0.0, ref=0.0):
    """Gradient and Hessian of Q(θ) + (prox/2)‖θ − ref‖²."""
    p = sigmoid(x @ theta)
    w = np.full(n, 1 / n)
    if z is not None:
        w[z] -= eps
    g = x.T @ (w * (p - y)) + wd * theta + prox * (theta - ref)
    h = (x * (w * p * (1 - p))[:, None]).T @ x + (wd + prox) * np.eye(d)
    return g, h


theta_s, grad_norm = newton(downweighted, np.zeros(d))
p_s = sigmoid(x @ theta_s)
s1, s2 = p_s * (1 - p_s), p_s * (1 - p_s) * (1 - 2 * p_s)
G = (x * (s1 / n)[:, None]).T @ x + wd * np.eye(d)
Gd = G + lam * np.eye(d)
leverage = np.einsum("ij,jk,ik->i", x, np.linalg.inv(Gd), x) * s1 / n
print(
    f"θˢ gradient norm {grad_norm:.1e}; leverage ε σ' x̃ᵀ(G+λI)⁻¹x̃ over the training set: "
    f"mean {leverage.mean():.4f}, max {leverage.max():.3f}, {(leverage > 0.05).sum()} > 0.05"
)


def pbrf(eps, z):
    def gradient_hessian(theta):
        p = sigmoid(x @ theta)
        g = x.T @ ((p - p_s) / n) - eps * x[z] * (p[z] - y[z]) + (wd + lam) * (theta - theta_s)
        h = (x * (p * (1 - p) / n)[:, None]).T @ x + (wd + lam) * np.eye(d)
        return g, h - eps * p[z] * (1 - p[z]) * np.outer(x[z], x[z])

    return newton(gradient_hessian, theta_s)[0]


def dist(a, b):
    return np.linalg.norm(x @ (a - b))


def closed_form(G, eps, z, gz):
    """‖X[H_Q⁻¹ − (H_Q+λI)⁻¹] ε∇L_z‖, H_Q = G − ε σ'_z x̃ x̃ᵀ the Hessian of Q at θˢ."""
    hq = G - eps * s1[z] * np.outer(x[z], x[z])
    step = np.linalg.solve(hq, gz) - np.linalg.solve(hq + lam * np.eye(d), gz)
    return np.linalg.norm(x @ (eps * step))


result = json.loads((ROOT / "docs/experiments/cancer_logreg/decomposition.json").read_text())
removed = [z for (z,) in result["removed"]]
rows = []
for z in removed:
    eps = 1 / n
    gz = x[z] * (p_s[z] - y[z])
    warm = newton(lambda t, z=z, eps=eps: downweighted(t, eps, z), theta_s)[0]
    prox = newton(lambda t, z=z, eps=eps: downweighted(t, eps, z, lam, theta_s), theta_s)[0]
    lin = theta_s + eps * np.linalg.solve(Gd, gz)
    closed = closed_form(G, eps, z, gz)
    u = x @ (lin - theta_s)
    second = np.linalg.solve(Gd, eps * s1[z] * u[z] * x[z] - x.T @ (0.5 * s2 * u**2 / n))
    gaps = [dist(pbrf(eps * s, z), theta_s + s * (lin - theta_s)) for s in (1, 0.1, 0.01)]
    rows.append((z, leverage[z], dist(warm, prox), closed, *gaps, np.linalg.norm(x @ second)))

print(
    f"{'z':>5} {'leverage':>8} {'proximity':>9} {'closed':>9} {'lin gap':>9} "
    f"{'2nd order':>9} {'gap ε/10':>9} {'gap ε/100':>9}"
)
for z, lev, prox, closed, g1, g2, g3, pred in rows:
    print(f"{z:5d} {lev:8.4f} {prox:9.2e} {closed:9.2e} {g1:9.2e} {pred:9.2e} {g2:9.2e} {g3:9.2e}")
r = np.array([row[1:] for row in rows])
print(
    f"means: proximity {r[:, 1].mean():.4g}, closed form {r[:, 2].mean():.4g} "
    f"(ratio {r[:, 1].mean() / r[:, 2].mean():.4f}), linearization {r[:, 3].mean():.4g} "
    f"(median {np.median(r[:, 3]):.3g}), second-order prediction {r[:, 6].mean():.4g}"
)
big = r[:, 3] > 1e-6
ratio = r[:, 3] / r[:, 6]
print(f"gap / second-order prediction: median {np.median(ratio):.3f}, max {ratio.max():.3f}")
scaling = np.concatenate([r[big, 3] / r[big, 4] / 100, r[big, 3] / r[big, 5] / 1e4])
print(
    f"ε² scaling, gap(ε)/gap(ε/10)/100 and gap(ε)/gap(ε/100)/1e4 for gaps > 1e-6: "
    f"{scaling.min():.3f}..{scaling.max():.3f}"
)
order = np.argsort(-r[:, 3])
print(
    f"share of the summed linearization gap from the 5 largest: "
    f"{r[order[:5], 3].sum() / r[:, 3].sum():.3f}"
)
for scale in (0.1, 0.01):
    ex, cf = [], []
    for z in removed:
        eps = scale / n
        gz = x[z] * (p_s[z] - y[z])
        warm = newton(lambda t, z=z, eps=eps: downweighted(t, eps, z), theta_s)[0]
        prox = newton(lambda t, z=z, eps=eps: downweighted(t, eps, z, lam, theta_s), theta_s)[0]
        ex.append(dist(warm, prox))
        cf.append(closed_form(G, eps, z, gz))
    print(f"ε = {scale}/N: mean proximity / mean closed form = {np.mean(ex) / np.mean(cf):.4f}")
