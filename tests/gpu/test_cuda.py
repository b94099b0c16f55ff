"""The engine's exactness checks, the K-FAC preconditioner and compiled scoring on CUDA
(skipped without it).

Run by ``bench/gpu_check.sh`` on a machine with a GPU; on CPU-only machines every test
here is skipped with a reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from influence import CG, Exact, InfluenceEngine, Lanczos
from influence.kfac import KFAC
from tests.conftest import RTOL_F32, RTOL_SOLVE
from tests.influence.problems import dense_gnh, reference_scores, tiny_data, tiny_lm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DAMPING = 1e-3


def _problem(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    return model, torch.randn(40, 6, dtype=dtype), torch.randint(0, 4, (40,))


@pytest.mark.parametrize("solver", ["exact", "pcg"])
def test_cuda_scores_match_dense_cpu_solve(solver: str) -> None:
    model, x, t = _problem(torch.float64)
    engine = InfluenceEngine(model, train=(x, t), damping=DAMPING, device="cuda")
    assert engine.operator.device.type == "cuda"
    if solver == "exact":
        method = Exact()
    else:
        method = CG(tol=1e-11, max_iter=500, preconditioner=KFAC.from_operator(engine.operator))
    result = engine.scores((x[:3], t[:3]), method)

    dense = dense_gnh(model, "cross_entropy", x, t, weight_decay=0.0)
    dense += DAMPING * torch.eye(engine.num_params, dtype=torch.float64)
    expected = reference_scores(model, "cross_entropy", (x, t), (x[:3], t[:3]), dense)
    torch.testing.assert_close(result.scores.cpu(), expected, rtol=RTOL_SOLVE, atol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_jvp_and_gradient_scoring_agree_in_float32(compiled: bool) -> None:
    model, x, t = _problem(torch.float32)
    engine = InfluenceEngine(model, train=(x, t), device="cuda", compile_scoring=compiled)
    s_test = torch.randn(2, engine.num_params, device="cuda")
    jvp = engine.scores_from_s_test(s_test, method="jvp")
    grad = engine.scores_from_s_test(s_test, method="grad")
    torch.testing.assert_close(jvp, grad, rtol=RTOL_F32, atol=RTOL_F32 * float(grad.abs().max()))
    if compiled:
        assert engine.compiled_scoring.status == "compiled"


def test_cuda_lanczos_self_influence_matches_cpu() -> None:
    # The Ritz pairs come from a CPU tridiagonal eigensolve; the basis lives on the device.
    model, x, t = _problem(torch.float64)
    solver = Lanczos(rank=16, iterations=40)
    on = {
        device: InfluenceEngine(model, train=(x, t), damping=DAMPING, device=device)
        for device in ("cpu", "cuda")
    }
    cpu, cuda = (on[d].self_influence(solver) for d in ("cpu", "cuda"))
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=0)


def test_cuda_float32_convolutions_are_computed_without_tf32() -> None:
    """cuDNN computes float32 convolutions in TF32 by default (10-bit mantissa); the engine
    turns that off, so a float32 conv model on CUDA scores like the float64 CPU answer."""
    torch.manual_seed(0)
    model = models.build({"architecture": "lenet", "num_classes": 3, "width": 0.25})
    x, t = torch.randn(24, 1, 28, 28), torch.randint(0, 3, (24,))
    test = (x[:2], t[:2])
    expected = InfluenceEngine(model, train=(x, t), damping=0.1, dtype=torch.float64)
    reference = expected.scores(test, Exact()).scores
    engine = InfluenceEngine(model, train=(x, t), damping=0.1, device="cuda")
    assert engine.dtype == torch.float32
    got = engine.scores(test, Exact()).scores.cpu().double()
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert torch.backends.cudnn.allow_tf32  # the caller's (torch's default) setting is back


def test_cuda_bad_token_ids_are_refused_before_any_forward_pass() -> None:
    """An id outside the vocabulary is a device-side assert on CUDA, which would leave the
    process unusable: it must be a ValueError before the model sees the batch, and the
    device must still work afterwards."""
    tokens, next_tokens = tiny_data("tokens3", 8)
    tokens[5, 0] = 7
    with pytest.raises(ValueError, match=r"\[0, 3\).*training inputs example 5 has 7"):
        InfluenceEngine(tiny_lm(), train=(tokens, next_tokens), device="cuda")
    assert float(torch.ones(2, device="cuda").sum()) == 2.0
