"""Registry validation, forward shapes, bit-exact checkpoint round trips, determinism."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import models
from models import ConfigError
from tests.conftest import RTOL_EXACT

TINY_CONFIGS = {
    "logistic_regression": (
        {"architecture": "logistic_regression", "in_features": 5, "num_classes": 2},
        (1,),
    ),
    "logistic_regression_multi": (
        {"architecture": "logistic_regression", "in_features": 5, "num_classes": 4},
        (4,),
    ),
    "mlp": (
        {"architecture": "mlp", "in_features": 6, "hidden": [4, 3], "out_features": 2,
         "activation": "gelu"},
        (2,),
    ),
    "autoencoder": ({"architecture": "autoencoder", "widths": [8, 4, 2, 4, 8]}, (8,)),
    "lenet": (
        {"architecture": "lenet", "in_channels": 1, "image_size": 12, "num_classes": 3,
         "width": 0.25},
        (3,),
    ),
    "alexnet": (
        {"architecture": "alexnet", "in_channels": 3, "image_size": 8, "num_classes": 3,
         "width": 1 / 32},
        (3,),
    ),
    "vgg13": (
        {"architecture": "vgg13", "in_channels": 3, "image_size": 8, "num_classes": 3,
         "width": 1 / 32},
        (3,),
    ),
    "resnet20": (
        {"architecture": "resnet20", "in_channels": 2, "image_size": 6, "num_classes": 3,
         "width": 0.25},
        (3,),
    ),
    "transformer_lm": (
        {"architecture": "transformer_lm", "vocab_size": 7, "context_length": 5, "d_model": 8,
         "n_layers": 1, "n_heads": 2},
        (5, 7),
    ),
}  # fmt: skip


def test_every_registered_architecture_has_a_tiny_config() -> None:
    covered = {config["architecture"] for config, _ in TINY_CONFIGS.values()}
    assert covered == set(models.ARCHITECTURES)


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_builds_forwards_and_round_trips(key: str, tmp_path) -> None:
    config, out_shape = TINY_CONFIGS[key]
    model = models.build(config)
    x = models.example_input(config, batch_size=3, generator=torch.Generator().manual_seed(1))
    y = model(x)
    assert y.shape == (3, *out_shape)
    assert torch.isfinite(y).all()

    path = tmp_path / "ckpt.safetensors"
    models.save_checkpoint(path, model, config)
    loaded, loaded_config = models.load_checkpoint(path)
    assert loaded_config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded(x), y)
    assert models.checkpoint_id(loaded, loaded_config) == models.checkpoint_id(model, config)
    from_bytes, _ = models.load_checkpoint_bytes(path.read_bytes())
    assert models.checkpoint_id(from_bytes, config) == models.checkpoint_id(model, config)


@pytest.mark.parametrize("key", ["vgg13", "resnet20", "transformer_lm"])
def test_function_of_theta_is_deterministic_and_mode_independent(key: str) -> None:
    config, _ = TINY_CONFIGS[key]
    model = models.build(config)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = models.example_input(config, batch_size=4, generator=torch.Generator().manual_seed(2))
    model.train()
    in_train = functional_call(model, params, (x,))
    model.eval()
    in_eval = functional_call(model, params, (x,))
    assert torch.equal(in_train, in_eval)
    # per-example: the batch does not mix examples (GroupNorm/LayerNorm, no BatchNorm)
    single = functional_call(model, params, (x[1:2],))
    torch.testing.assert_close(single, in_eval[1:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_per_example_gradients_under_vmap_match_a_loop(key: str) -> None:
    """The engine differentiates ``functional_call`` under ``vmap``; check it in float64."""
    config, _ = TINY_CONFIGS[key]
    model = models.build(config).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = models.example_input(config, batch_size=2, generator=torch.Generator().manual_seed(3))
    x = x.double() if x.is_floating_point() else x

    def loss(theta: dict, example: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta, (example[None],)).pow(2).sum()

    batched = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(2):
        single = grad(loss)(params, x[i])
        for name in params:
            torch.testing.assert_close(batched[name][i], single[name], rtol=RTOL_EXACT, atol=1e-12)


def test_checkpoint_id_changes_with_weights_and_config() -> None:
    config, _ = TINY_CONFIGS["mlp"]
    model = models.build(config)
    base = models.checkpoint_id(model, config)
    assert len(base) == 64 and int(base, 16) >= 0
    assert models.checkpoint_id(model, dict(reversed(list(config.items())))) == base
    with torch.no_grad():
        model[0].bias[0] += 1e-6
    assert models.checkpoint_id(model, config) != base


def test_transformer_is_causal() -> None:
    config, _ = TINY_CONFIGS["transformer_lm"]
    model = models.build(config).eval()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    changed = tokens.clone()
    changed[0, 3] = 0
    a, b = model(tokens), model(changed)
    assert torch.equal(a[0, :3], b[0, :3])
    assert not torch.equal(a[0, 3:], b[0, 3:])


@pytest.mark.parametrize(
    ("config", "parameters"),
    [
        ({"architecture": "lenet"}, 61_706),  # LeNet-5 on 28×28
        ({"architecture": "resnet20"}, 272_474),  # ≈ 0.27M of He et al.; 1×1 projections
        ({"architecture": "mlp", "in_features": 64, "hidden": [32, 32], "out_features": 10}, 3_466),
    ],
)
def test_default_sizes(config: dict, parameters: int) -> None:
    model = models.build(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(models.example_input(config, batch_size=1)).shape[-1] == 10


def test_default_autoencoder_is_the_papers() -> None:
    model = models.build({"architecture": "autoencoder"})
    widths = [m.in_features for m in model if isinstance(m, torch.nn.Linear)]
    assert [*widths, 784] == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model) == 7


def test_binary_logistic_regression_has_one_logit() -> None:
    model = models.build({"architecture": "logistic_regression", "in_features": 3})
    assert model.weight.shape == (1, 3)


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"architecture": "nope"}, ["unknown architecture 'nope'", "resnet20", "mlp"]),
        ({"in_features": 3}, ["no 'architecture' key", "transformer_lm"]),
        ("mlp", ["config must be a dict"]),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 2, "depth": 4},
            ["unknown argument(s) ['depth']", "hidden: list[int]", "activation"],
        ),
        ({"architecture": "mlp", "in_features": 3}, ["missing argument(s) ['out_features']"]),
        (
            {"architecture": "mlp", "in_features": "3", "out_features": 2},
            ["'in_features' of mlp must be int", "'3'"],
        ),
        (
            {"architecture": "mlp", "in_features": True, "out_features": 2},
            ["'in_features' of mlp must be int"],
        ),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 2, "hidden": [4, 2.5]},
            ["'hidden' of mlp must be list[int]"],
        ),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 2, "activation": "swish"},
            ["'activation' of mlp must be 'relu' | 'tanh' | 'sigmoid' | 'gelu'"],
        ),
        ({"architecture": "mlp", "in_features": 0, "out_features": 2}, ["'in_features'", ">= 1"]),
        (
            {"architecture": "transformer_lm", "vocab_size": 5, "context_length": 4,
             "d_model": 6, "n_heads": 4},
            ["'d_model' of transformer_lm (6) must be divisible by 'n_heads' (4)"],
        ),
        ({"architecture": "lenet", "image_size": 8}, ["'image_size' of lenet must be >= 12"]),
        ({"architecture": "vgg13", "width": float("nan")}, ["'width' of vgg13 must be float"]),
        *(
            ({"architecture": arch, "width": width}, [f"'width' of {arch} must be > 0"])
            for arch in ("lenet", "alexnet", "vgg13", "resnet20")
            for width in (0, 0.0, -1.0)
        ),
        ({"architecture": "lenet", "width": 1e30}, ["'width' (1e+30) scales 6 to over"]),
        ({"architecture": ["mlp"]}, ["'architecture' must be a string, got list"]),
        ({"architecture": {"mlp": 1}}, ["'architecture' must be a string, got dict"]),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 10**30},
            ["argument 'out_features' of mlp is over the limit of 2147483647"],
        ),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 2, "hidden": [2**31]},
            ["argument 'hidden' of mlp is over the limit"],
        ),
        (
            {"architecture": "mlp", "in_features": 3, "out_features": 2, "hidden": [1] * 1001},
            ["argument 'hidden' of mlp asks for 1001 layers, over the limit of 1000"],
        ),
        (
            {"architecture": "transformer_lm", "vocab_size": 5, "context_length": 4,
             "n_layers": 10**6},
            ["argument 'n_layers' of transformer_lm asks for 1000000 layers"],
        ),
    ],
)  # fmt: skip
def test_bad_configs_name_the_problem(config, fragments) -> None:
    with pytest.raises(ConfigError) as info:
        models.build(config)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_register_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        models.register("mlp", "flat")(lambda: torch.nn.Identity())
