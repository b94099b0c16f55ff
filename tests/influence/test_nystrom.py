"""Nyström preconditioner: the approximation against dense Gauss-Newton matrices, P⁻¹
against a dense construction from ``eigh``, and PCG against dense float64 solves."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from influence import CG, InfluenceEngine, NonFiniteError
from influence.nystrom import NystromArguments, NystromPreconditioner, _stable_nystrom
from tests.conftest import RTOL_EXACT, RTOL_SOLVE, rel_error
from tests.influence.problems import dense_gnh, tiny_data, tiny_mlp

DAMPING = 1e-3
WEIGHT_DECAY = 1e-2


def _engine(n: int, dtype: torch.dtype = torch.float64, **kwargs: object) -> InfluenceEngine:
    model = tiny_mlp(3)
    return InfluenceEngine(
        model, train=tiny_data("classes3", n), damping=DAMPING, weight_decay=WEIGHT_DECAY,
        dtype=dtype, **kwargs,
    )  # fmt: skip


def _data_gnh(n: int, indices: Tensor | None = None) -> Tensor:
    """``Σ_{i∈S} J_iᵀ H_i J_i`` / N from jacrev (S = all when indices is None), no wd."""
    x, t = tiny_data("classes3", n)
    if indices is not None:
        x, t = x[indices], t[indices]
    return dense_gnh(tiny_mlp(3), "cross_entropy", x, t, 0.0) * len(x) / n


def _approximation(p: NystromPreconditioner) -> Tensor:
    u = p.vectors.double()
    return u @ torch.diag(p.values.double()) @ u.T


def _dense_inverse(vectors: Tensor, values: Tensor, mu: float) -> Tensor:
    """``(λ_s + μ) V (Λ + μ)⁻¹ Vᵀ + (I − VVᵀ)`` as a dense matrix."""
    eye = torch.eye(len(vectors), dtype=vectors.dtype)
    floor = values.min() + mu
    return floor * vectors @ torch.diag(1 / (values + mu)) @ vectors.T + eye - vectors @ vectors.T


def test_full_rank_sketch_reproduces_the_gauss_newton_matrix() -> None:
    engine = _engine(20)
    p = NystromPreconditioner.fit(engine.operator, rank=engine.num_params + 7)
    assert p.report()["sketch_size"] == engine.num_params
    assert rel_error(_approximation(p), _data_gnh(20)) < RTOL_EXACT
    assert rel_error(p.vectors.T @ p.vectors, torch.eye(p.rank, dtype=torch.float64)) < RTOL_EXACT


def test_sketch_at_least_the_rank_of_g_is_exact_below_d() -> None:
    # 3 examples, 3 classes: rank(G) ≤ 3·(3 − 1) = 6 < rank 10 < d = 57
    engine = _engine(3)
    p = NystromPreconditioner.fit(engine.operator, rank=10, seed=1)
    assert engine.num_params > 10
    assert p.rank <= 6
    assert rel_error(_approximation(p), _data_gnh(3)) < RTOL_EXACT


@pytest.mark.parametrize("selection", ["curvature", "random"])
def test_subset_sketch_is_the_subset_curvature(selection: str) -> None:
    engine = _engine(20)
    p = NystromPreconditioner.fit(
        engine.operator, rank=engine.num_params, examples=6, selection=selection
    )
    assert p.examples == 6 and p.indices is not None and len(p.indices.unique()) == 6
    subset = _data_gnh(20, p.indices)
    expected = subset if selection == "curvature" else subset * 20 / 6  # sum/N vs mean
    assert rel_error(_approximation(p), expected) < RTOL_EXACT


def test_curvature_selection_takes_the_largest_traces() -> None:
    n = 20
    x, t = tiny_data("classes3", n)
    traces = torch.stack(
        [torch.trace(dense_gnh(tiny_mlp(3), "cross_entropy", x[i : i + 1], t[i : i + 1], 0.0))
         for i in range(n)]
    )  # fmt: skip
    engine = _engine(n)
    p = NystromPreconditioner.fit(engine.operator, rank=5, examples=5, probes=4000)
    top = set(traces.topk(5).indices.tolist())
    chosen = set(p.indices.tolist())
    # Hutchinson estimates: the chosen set carries (almost) the largest possible trace
    assert float(traces[p.indices].sum()) >= 0.97 * float(traces[list(top)].sum())
    assert len(top & chosen) >= 4


def test_inverse_matches_a_dense_construction_from_eigh() -> None:
    engine = _engine(20)
    p = NystromPreconditioner.fit(engine.operator, rank=engine.num_params)
    values, vectors = torch.linalg.eigh(_data_gnh(20))
    keep = values > 1e-9 * values.max()
    mu = DAMPING + WEIGHT_DECAY
    expected = _dense_inverse(vectors[:, keep], values[keep], mu)
    eye = torch.eye(engine.num_params, dtype=torch.float64)
    assert p.rank == int(keep.sum())
    assert rel_error(p(eye), expected) < 1e-8
    v = torch.randn(engine.num_params, 4, dtype=torch.float64)
    assert rel_error(p(v), expected @ v) < 1e-8
    assert rel_error(p(v[:, 0]), expected @ v[:, 0]) < 1e-8
    assert p(v[:, 0]).shape == (engine.num_params,)


def test_low_rank_inverse_matches_its_dense_form() -> None:
    engine = _engine(20)
    p = NystromPreconditioner.fit(engine.operator, rank=8)
    mu = DAMPING + WEIGHT_DECAY
    expected = _dense_inverse(p.vectors, p.values, mu)
    v = torch.randn(engine.num_params, 3, dtype=torch.float64)
    assert rel_error(p(v), expected @ v) < RTOL_EXACT
    assert torch.linalg.eigvalsh(expected).min() > 0


@pytest.mark.parametrize(
    "settings",
    [{"rank": 8}, {"rank": 12, "examples": 8}, {"rank": 12, "examples": 8, "selection": "random"}],
)
def test_pcg_reaches_the_dense_solve(settings: dict[str, object]) -> None:
    engine = _engine(20)
    op = engine.operator
    matrix = _data_gnh(20) + (DAMPING + WEIGHT_DECAY) * torch.eye(engine.num_params).double()
    rhs = torch.randn(engine.num_params, 3, dtype=torch.float64)
    expected = torch.linalg.solve(matrix, rhs)
    p = NystromPreconditioner.fit(op, **settings)
    x, report = CG(tol=1e-12, preconditioner=p).solve(op, rhs)
    assert report.method == "pcg" and report.converged
    assert rel_error(x, expected) < RTOL_SOLVE
    _, plain = CG(tol=1e-12).solve(op, rhs)
    assert report.iterations < plain.iterations


def test_cg_fits_a_recipe_at_solve_time_and_reports_it() -> None:
    engine = _engine(20)
    op = engine.operator
    matrix = _data_gnh(20) + (DAMPING + WEIGHT_DECAY) * torch.eye(engine.num_params).double()
    rhs = torch.randn(engine.num_params, 3, dtype=torch.float64)
    solver = CG(tol=1e-12, preconditioner=NystromArguments(rank=12, examples=8))
    x, report = solver.solve(op, rhs)
    assert rel_error(x, torch.linalg.solve(matrix, rhs)) < RTOL_SOLVE
    assert report.method == "pcg"
    assert report.details["preconditioner"]["rank"] <= 12
    assert report.details["preconditioner"]["examples"] == 8
    fitted = solver.calibrated(op)
    assert isinstance(fitted.preconditioner, NystromPreconditioner)
    assert fitted.calibrated(op) is fitted
    assert torch.equal(fitted.solve(op, rhs)[0], x)


def test_self_influence_with_a_nystrom_recipe_matches_exact() -> None:
    engine = _engine(20)
    matrix = _data_gnh(20) + (DAMPING + WEIGHT_DECAY) * torch.eye(engine.num_params).double()
    grads = engine.gradients(*tiny_data("classes3", 20))
    expected = (grads * torch.linalg.solve(matrix, grads.T).T).sum(dim=1) / 20
    solver = CG(tol=1e-12, preconditioner=NystromArguments(rank=16))
    assert rel_error(engine.self_influence(solver), expected) < RTOL_SOLVE
    assert engine.last_report.details["preconditioner"]["rank"] <= 16


def test_float32_path_agrees_with_dense_float64() -> None:
    # float32 operators orthonormalise the sketch by Cholesky QR with a float64 Gram matrix
    engine = _engine(3, dtype=torch.float32)
    p = NystromPreconditioner.fit(engine.operator, rank=10)
    assert p.basis.dtype == torch.float32
    # float32 products and the shift ν ≈ √d·eps₃₂·‖Y‖ limit the agreement to ~1e-5
    assert rel_error(_approximation(p), _data_gnh(3)) < 1e-4
    assert rel_error(p.vectors.T @ p.vectors, torch.eye(p.rank)) < 1e-6
    engine = _engine(20, dtype=torch.float32)
    matrix = _data_gnh(20) + (DAMPING + WEIGHT_DECAY) * torch.eye(engine.num_params).double()
    rhs = torch.randn(engine.num_params, 2)
    p = NystromPreconditioner.fit(engine.operator, rank=16, examples=10)
    x, report = CG(tol=1e-5, preconditioner=p).solve(engine.operator, rhs)
    assert report.converged
    assert rel_error(x.double(), torch.linalg.solve(matrix, rhs.double())) < 1e-4


def test_full_hessian_is_refused() -> None:
    engine = _engine(20, hessian="full")
    with pytest.raises(ValueError, match="hessian='gnh'"):
        NystromPreconditioner.fit(engine.operator, rank=engine.num_params)


def test_non_finite_sketch_raises() -> None:
    omega = torch.randn(3, 10, dtype=torch.float64)
    sketch = omega.clone()
    sketch[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="sketch"):
        _stable_nystrom(omega, sketch)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", 2.5),
        ("examples", 0),
        ("probes", 0),
        ("columns_per_pass", 0),
        ("selection", "largest"),
        ("seed", "zero"),
    ],
)
def test_invalid_arguments_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        NystromArguments(**{field: value})


def test_fit_and_call_validate_their_inputs() -> None:
    engine = _engine(5)
    with pytest.raises(ValueError, match="rank"):
        NystromPreconditioner.fit(engine.operator, rank=-1)
    undamped = InfluenceEngine(tiny_mlp(3), train=tiny_data("classes3", 5), damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        NystromPreconditioner.fit(undamped.operator, rank=3)
    p = NystromPreconditioner.fit(engine.operator, NystromArguments(rank=3))
    with pytest.raises(ValueError, match="expected a vector"):
        p(torch.zeros(engine.num_params + 1, dtype=torch.float64))
    report = p.report()
    assert report["rank"] == p.rank and report["examples"] == 5
    assert report["lambda_max"] >= report["lambda_min"] > 0
