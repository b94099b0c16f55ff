"""Tiny seeded problems and independent dense references for the engine's tests.

The references are built from ``torch.func.jacrev``, ``torch.func.hessian`` of the loss
*values* in output space, and row-by-row autograd Hessians (never from
``models.losses.output_hvp`` or the engine's own products), so a test that compares the
engine against them checks the engine, not the engine against itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev

import models
from influence.functional import FlatModel
from models.losses import get_loss


def _loss_of(loss_name: str) -> Callable[[Tensor, Tensor], Tensor]:
    return get_loss(loss_name).per_example


def dense_gnh(
    model: nn.Module, loss_name: str, inputs: Tensor, targets: Tensor, weight_decay: float
) -> Tensor:
    """``(1/N) Σ_i J_iᵀ H_i J_i + wd·I`` with ``J_i`` from ``jacrev`` and ``H_i`` the
    ``torch.func.hessian`` of the per-example loss value in output space."""
    fmodel, theta = FlatModel.of(model)
    per_example = _loss_of(loss_name)
    d = theta.numel()
    total = torch.zeros(d, d, dtype=theta.dtype)
    for x, t in zip(inputs, targets, strict=True):
        xb, tb = x.unsqueeze(0), t.unsqueeze(0)
        jac = jacrev(lambda p, xb=xb: fmodel(p, xb))(theta).reshape(-1, d)
        y = fmodel(theta, xb)
        h = hessian(lambda out, tb=tb, shape=y.shape: per_example(out.reshape(shape), tb)[0])(
            y.reshape(-1)
        )
        total += jac.T @ h @ jac
    return total / len(inputs) + weight_decay * torch.eye(d, dtype=theta.dtype)


def dense_hessian(
    model: nn.Module, loss_name: str, inputs: Tensor, targets: Tensor, weight_decay: float
) -> Tensor:
    """``∇²_θ [(1/N) Σ_i L_i + (wd/2)‖θ‖²]``, row by row with plain autograd.

    Not ``torch.func.hessian``: in torch 2.13 its rows for LayerNorm weights are wrong
    (vmapped double backward; off by ~4% against central finite differences on
    ``tiny_lm``), while this loop agrees with finite differences.
    """
    fmodel, theta = FlatModel.of(model)
    per_example = _loss_of(loss_name)

    def cost(p: Tensor) -> Tensor:
        return per_example(fmodel(p, inputs), targets).mean() + 0.5 * weight_decay * p @ p

    return torch.autograd.functional.hessian(cost, theta)


def loop_grads(model: nn.Module, loss_name: str, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example gradients ``[N, d]`` by a Python loop of ``torch.func.grad``."""
    fmodel, theta = FlatModel.of(model)
    per_example = _loss_of(loss_name)
    rows = [
        grad(lambda p, x=x, t=t: per_example(fmodel(p, x[None]), t[None])[0])(theta)
        for x, t in zip(inputs, targets, strict=True)
    ]
    return torch.stack(rows)


def reference_scores(
    model: nn.Module,
    loss_name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    matrix: Tensor,
) -> Tensor:
    """``(1/N) G_test (matrix)⁻¹ G_trainᵀ`` by a dense float64 solve, shape ``[k, N]``."""
    g_train = loop_grads(model, loss_name, *train).double()
    g_test = loop_grads(model, loss_name, *test).double()
    return g_test @ torch.linalg.solve(matrix.double(), g_train.T) / len(train[0])


# ----------------------------------------------------------------------------- problems


def tiny_mlp(out_features: int, activation: str = "tanh", seed: int = 0) -> nn.Module:
    """A float64 MLP 5-6-out from ``models.build``, seeded."""
    torch.manual_seed(seed)
    config = {
        "architecture": "mlp",
        "in_features": 5,
        "out_features": out_features,
        "hidden": [6],
        "activation": activation,
    }
    return models.build(config).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A float64 LeNet on 1×12×12 images, scaled down to 437 parameters."""
    torch.manual_seed(seed)
    config = {
        "architecture": "lenet",
        "in_channels": 1,
        "image_size": 12,
        "num_classes": 3,
        "width": 0.1,
    }
    return models.build(config).double()


TINY_LM_CONFIG = {
    "architecture": "transformer_lm",
    "vocab_size": 3,
    "context_length": 3,
    "d_model": 2,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 4,
}


def tiny_lm(seed: int = 0) -> nn.Module:
    """A float64 one-block transformer LM (2 heads), vocabulary 3, context 3: 79 parameters."""
    torch.manual_seed(seed)
    return models.build(TINY_LM_CONFIG).double()


def tiny_data(kind: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded inputs/targets: ``classes3`` (5 features, 3 classes), ``regression2``,
    ``binary2`` (two 0/1 outputs), ``images3`` (1×12×12, 3 classes), ``tokens3``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "images3":
        return torch.randn(n, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(
            3, (n,), generator=g
        )
    if kind == "tokens3":
        return torch.randint(3, (n, 3), generator=g), torch.randint(3, (n, 3), generator=g)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    if kind == "classes3":
        return x, torch.randint(3, (n,), generator=g)
    if kind == "regression2":
        return x, torch.randn(n, 2, generator=g, dtype=torch.float64)
    if kind == "binary2":
        return x, torch.randint(2, (n, 2), generator=g).double()
    raise ValueError(kind)


@functools.cache
def three_class_set(n: int, seed: int) -> models.Dataset:
    """n seeded float64 points in 3-d, three classes cut by two thresholds (a Dataset)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return models.Dataset(x, t, {"task": "classification", "num_classes": 3})


def digits_mlp() -> tuple[nn.Module, models.Dataset, models.Dataset]:
    """Digits MLP 64-16-10 (tanh), 300 full-batch Adam steps (lr 1e-2, seed 0).

    Cached for the session; callers must not modify the returned objects.
    """
    train = models.builtin_dataset("digits", "train")
    test = models.builtin_dataset("digits", "test")
    config = {
        "architecture": "mlp",
        "in_features": 64,
        "out_features": 10,
        "hidden": [16],
        "activation": "tanh",
    }
    recipe = models.Recipe(optimizer="adam", lr=1e-2, epochs=300, seed=0)
    run = models.train(config, train, recipe)
    return run.model(), train, test
