"""K-FAC preconditioner: factors against dense Gauss-Newton blocks, and PCG against dense solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import models
from influence import CG, InfluenceEngine
from influence.kfac import KFAC, KFACArguments
from tests.conftest import RTOL_EXACT, RTOL_SOLVE

DAMPING = 1e-3


def _flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return names, shapes, flat


def dense_gnh(model: nn.Module, x: Tensor, t: Tensor, loss: str) -> Tensor:
    """(1/N) Σ_i J_iᵀ H_i J_i from jacrev/hessian, independent of models.losses."""
    names, shapes, flat = _flat_params(model)

    def outputs(theta: Tensor, xi: Tensor) -> Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        p = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    def loss_of_outputs(y: Tensor, ti: Tensor) -> Tensor:
        if loss == "cross_entropy":
            return F.cross_entropy(y.unsqueeze(0), ti.unsqueeze(0))
        return 0.5 * (y - ti).pow(2).sum()

    total = torch.zeros(len(flat), len(flat), dtype=flat.dtype)
    for xi, ti in zip(x, t, strict=True):
        jac = jacrev(outputs)(flat, xi)
        h_y = hessian(loss_of_outputs)(outputs(flat, xi), ti)
        total += jac.T @ h_y @ jac
    return total / len(x)


def _linear_slices(model: nn.Module) -> list[slice]:
    """Flat ranges of each Linear's [weight, bias] (adjacent in named_parameters)."""
    slices, offset = [], 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            size = sum(p.numel() for p in module.parameters())
            slices.append(slice(offset, offset + size))
            offset += size
        elif not list(module.children()):
            offset += sum(p.numel() for p in module.parameters(recurse=False))
    return slices


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
def test_single_example_blocks_equal_dense_gnh(approximation: str) -> None:
    model = _mlp()
    x = torch.randn(1, 3, dtype=torch.float64)
    t = torch.tensor([2])
    kfac = KFAC.fit(
        model,
        "cross_entropy",
        x,
        t,
        damping=DAMPING,
        weight_decay=0.01,
        arguments=KFACArguments(approximation=approximation),
    )
    dense = dense_gnh(model, x, t, "cross_entropy")
    approx = kfac.to_dense() - (DAMPING + 0.01) * torch.eye(kfac.dim, dtype=torch.float64)
    for sl in _linear_slices(model):
        torch.testing.assert_close(approx[sl, sl], dense[sl, sl], rtol=RTOL_EXACT, atol=1e-14)
    first, second = _linear_slices(model)
    assert torch.count_nonzero(approx[first, second]) == 0


def _linear_regression() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = nn.Linear(4, 2).double()
    return model, torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
def test_single_linear_layer_under_mse_is_exact_for_many_examples(approximation: str) -> None:
    model, x, t = _linear_regression()
    kfac = KFAC.fit(
        model, "mse", x, t, damping=DAMPING, arguments=KFACArguments(approximation=approximation)
    )
    dense = dense_gnh(model, x, t, "mse") + DAMPING * torch.eye(kfac.dim, dtype=torch.float64)
    torch.testing.assert_close(kfac.to_dense(), dense, rtol=RTOL_EXACT, atol=1e-14)
    v = torch.randn(kfac.dim, dtype=torch.float64)
    torch.testing.assert_close(kfac(v), torch.linalg.solve(dense, v), rtol=RTOL_SOLVE, atol=0)


def test_ekfac_eigenvalues_are_the_dense_gnh_diagonal_in_the_kronecker_basis() -> None:
    """Where K-FAC is not exact (two layers, cross-entropy, eight examples) EK-FAC keeps
    the eigenbasis Q = Q_S ⊗ Q_A and puts diag(Qᵀ G_layer Q) + γ there (George et al.
    2018), G_layer the layer's block of the independent jacrev/hessian GNH; K-FAC's
    s_i·a_j + γ in the same basis must differ, or the test would not see the correction."""
    model = _mlp()
    x = torch.randn(8, 3, dtype=torch.float64)
    t = torch.randint(0, 3, (8,))
    weight_decay, gamma = 0.01, DAMPING + 0.01
    fits = {}
    for approximation in ("ekfac", "kfac"):
        arguments = KFACArguments(approximation=approximation, batch_size=3)
        fits[approximation] = KFAC.fit(model, "cross_entropy", x, t, damping=DAMPING,
                                       weight_decay=weight_decay, arguments=arguments)  # fmt: skip
    dense = dense_gnh(model, x, t, "cross_entropy")
    for block, kfac_block in zip(fits["ekfac"].blocks, fits["kfac"].blocks, strict=True):
        basis = torch.kron(block.s_basis, block.a_basis)
        eye = torch.eye(len(basis), dtype=torch.float64)
        torch.testing.assert_close(basis.T @ basis, eye, rtol=0, atol=1e-12)
        flat = block.index.reshape(-1)
        layer = dense[flat.unsqueeze(1), flat.unsqueeze(0)]
        expected = torch.diagonal(basis.T @ layer @ basis).reshape(block.eigenvalues.shape)
        torch.testing.assert_close(block.eigenvalues, expected + gamma, rtol=RTOL_EXACT, atol=1e-14)
        # the same basis under K-FAC (deterministic eigh of the same factors) ...
        torch.testing.assert_close(kfac_block.s_basis, block.s_basis, rtol=0, atol=0)
        torch.testing.assert_close(kfac_block.a_basis, block.a_basis, rtol=0, atol=0)
        # ... but eigenvalues s_i·a_j + γ that miss the correction by far more than rtol
        # (23% on the hidden layer; 0.3% on the output layer, whose output Hessians are
        # nearly alike: the untrained softmax is close to uniform on every example)
        shift = (kfac_block.eigenvalues - block.eigenvalues).norm() / block.eigenvalues.norm()
        assert shift > 1e-3, f"{block.name}: K-FAC and EK-FAC eigenvalues agree ({shift:.2e})"


def test_pi_correction_damps_each_factor() -> None:
    model, x, t = _linear_regression()
    gamma = DAMPING + 0.01
    kfac = KFAC.fit(
        model, "mse", x, t, damping=DAMPING, weight_decay=0.01,
        arguments=KFACArguments(approximation="kfac-pi"),
    )  # fmt: skip
    a_bar = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    a = a_bar.T @ a_bar / len(x)  # S = I for ½‖y − t‖² on a single layer
    pi = (torch.trace(a) / 5 / (2 / 2)).sqrt()
    eye_s, eye_a = torch.eye(2, dtype=x.dtype), torch.eye(5, dtype=x.dtype)
    expected = torch.kron((1 + pi * gamma**0.5) * eye_s, a + gamma**0.5 / pi * eye_a)
    order = torch.tensor([0, 1, 2, 3, 8, 4, 5, 6, 7, 9])  # [W | b] rows -> weight, then bias
    dense = kfac.to_dense()[order][:, order]
    torch.testing.assert_close(dense, expected, rtol=RTOL_EXACT, atol=0)


@pytest.mark.parametrize("approximation", ["ekfac", "kfac", "kfac-pi"])
def test_inverse_matches_dense_approximation_with_fallback(approximation: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4, bias=False)
    ).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    t = torch.randint(0, 4, (9,))
    kfac = KFAC.fit(
        model,
        "cross_entropy",
        x,
        t,
        damping=DAMPING,
        arguments=KFACArguments(approximation=approximation, batch_size=4),
    )
    assert kfac.summary()["diagonal_parameters"] == 10  # LayerNorm weight + bias
    m = kfac.to_dense()
    vs = torch.randn(kfac.dim, 3, dtype=torch.float64)
    torch.testing.assert_close(kfac(vs), torch.linalg.solve(m, vs), rtol=RTOL_SOLVE, atol=0)
    torch.testing.assert_close(kfac(vs[:, 0]), kfac(vs)[:, 0], rtol=RTOL_EXACT, atol=0)


def test_fallback_is_the_exact_gnh_diagonal() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.randint(0, 4, (6,))
    kfac = KFAC.fit(model, "cross_entropy", x, t, damping=DAMPING, weight_decay=0.1)
    dense = dense_gnh(model, x, t, "cross_entropy")
    norm = slice(20, 30)  # Linear(3, 5) holds 20 parameters, then LayerNorm's 10
    expected = torch.diagonal(dense)[norm] + DAMPING + 0.1
    torch.testing.assert_close(kfac.diagonal, expected, rtol=RTOL_EXACT, atol=0)
    assert kfac.diagonal_index.tolist() == list(range(20, 30))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"approximation": "kfac-exact"}, "approximation"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_output_dim": 2.5}, "max_output_dim"),
    ],
)
def test_arguments_name_the_bad_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACArguments(**kwargs)


def test_fit_rejects_bad_inputs() -> None:
    model = _mlp()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="equal length"):
        KFAC.fit(model, "cross_entropy", x, torch.zeros(3, dtype=torch.long), damping=DAMPING)
    with pytest.raises(ValueError, match="damping"):
        KFAC.fit(model, "cross_entropy", x, torch.zeros(4, dtype=torch.long), damping=0.0)
    kfac = KFAC.fit(model, "cross_entropy", x, torch.zeros(4, dtype=torch.long), damping=DAMPING)
    with pytest.raises(ValueError, match=f"\\[{kfac.dim}\\]"):
        kfac(torch.zeros(kfac.dim + 1, dtype=torch.float64))


@pytest.mark.parametrize("hidden", [[], [16]])
def test_pcg_matches_dense_solve(hidden: list[int]) -> None:
    """PCG converges to the dense answer; on softmax regression it needs fewer iterations
    than plain CG (on a tanh MLP it does not: docs/benchmarks.md)."""
    train = models.builtin_dataset("digits").subset(list(range(200)))
    config = {"architecture": "mlp", "in_features": 64, "out_features": 10, "hidden": hidden}
    config["activation"] = "tanh"
    recipe = models.Recipe(optimizer="adam", lr=1e-2, epochs=100, batch_size=None, seed=0)
    model = models.train(config, train, recipe).model().double()
    x, t = train.inputs.double(), train.targets
    engine = InfluenceEngine(model, train=(x, t), damping=DAMPING)
    queries = (x[:3], t[:3])
    dense = dense_gnh(model, x, t, "cross_entropy") + DAMPING * torch.eye(
        engine.num_params, dtype=torch.float64
    )
    expected = torch.linalg.solve(dense, engine.gradients(*queries).T).T

    kfac = KFAC.from_operator(engine.operator)
    pcg, pcg_report = engine.s_test(queries, CG(tol=1e-12, max_iter=3000, preconditioner=kfac))
    plain, plain_report = engine.s_test(queries, CG(tol=1e-12, max_iter=3000))

    for solution in (pcg, plain):
        error = (solution - expected).norm() / expected.norm()
        assert error < RTOL_SOLVE
    assert pcg_report.method == "pcg" and pcg_report.converged
    if not hidden:
        assert pcg_report.iterations < plain_report.iterations


class _TokenHead(nn.Module):
    """A frozen embedding and a Linear applied at every position: [B, T] → [B, T, V]."""

    def __init__(self, vocab: int = 6, width: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width).requires_grad_(False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("positions", [1, 8])
def test_sequence_factors_average_over_positions(positions: int) -> None:
    """With T independent random positions per example the cross-position terms of the
    exact block average out, so tr(S ⊗ A) must stay near tr(G) whatever T: A averages
    over the N·T position rows while S sums the positions of each example."""
    torch.manual_seed(0)
    model = _TokenHead().double()
    tokens = torch.randint(0, 6, (300, positions))
    targets = torch.randint(0, 6, (300, positions))
    engine = InfluenceEngine(model, "cross_entropy", train=(tokens, targets), damping=0.0)
    exact = float(engine.operator.dense().trace())
    kfac = KFAC.fit(engine.model, "cross_entropy", tokens, targets, damping=1e-12,
                    arguments=KFACArguments(approximation="kfac"))  # fmt: skip
    assert 0.8 < float(kfac.to_dense().trace()) / exact < 1.25
