"""Architecture registry: ``build({"architecture": NAME, **kwargs}) -> nn.Module``.

Every architecture is a deterministic function of its parameters θ (no dropout, no
batch-norm running statistics), so ``torch.func.functional_call`` at fixed θ is a pure
function of the input — influence functions need that. Normalisation, where a network
has any, is GroupNorm or LayerNorm (per example, identical in train and eval mode).

Input conventions: ``"flat"`` models take float ``[B, F]``; ``"image"`` models take float
``[B, C, H, W]`` with ``H = W = image_size``; ``"tokens"`` models take int64 ``[B, T]``
with ``T <= context_length`` and return logits ``[B, T, vocab_size]``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.errors import ConfigError

__all__ = ["ARCHITECTURES", "Architecture", "build", "example_input", "input_shape", "register"]

InputKind = Literal["flat", "image", "tokens"]
MAX_SIZE = 2**31 - 1  # largest integer argument (and scaled channel count) accepted
MAX_LAYERS = 1000  # most layers (n_layers, or items of a list such as mlp's hidden) accepted
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its factory, typed parameters and input kind."""

    name: str
    factory: Callable[..., nn.Module]
    input_kind: InputKind
    hints: Mapping[str, Any]
    defaults: Mapping[str, Any]

    def describe(self) -> str:
        """``name(arg: type = default, ...)`` for error messages and docs."""
        parts = []
        for arg, hint in self.hints.items():
            text = f"{arg}: {_type_name(hint)}"
            if arg in self.defaults:
                text += f" = {self.defaults[arg]!r}"
            parts.append(text)
        return f"{self.name}({', '.join(parts)})"


ARCHITECTURES: dict[str, Architecture] = {}


def register(
    name: str, input_kind: InputKind
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a keyword-only factory to :data:`ARCHITECTURES` under ``name``.

    The factory's type hints are the config's validation rules. Its module must keep all
    state in parameters and persistent buffers (checkpoints hold only the state dict).
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        hints = typing.get_type_hints(factory)
        hints.pop("return", None)
        signature = inspect.signature(factory)
        defaults = {
            arg: p.default
            for arg, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        ARCHITECTURES[name] = Architecture(name, factory, input_kind, hints, defaults)
        return factory

    return decorate


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON-style value fits a type hint (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, hint)


def _resolve(config: Mapping[str, Any]) -> tuple[Architecture, dict[str, Any]]:
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict, got {type(config).__name__}")
    valid = ", ".join(sorted(ARCHITECTURES))
    if "architecture" not in config:
        raise ConfigError(f"config has no 'architecture' key; valid architectures: {valid}")
    name = config["architecture"]
    if not isinstance(name, str):
        raise ConfigError(
            f"config 'architecture' must be a string, got {type(name).__name__}; "
            f"valid architectures: {valid}"
        )
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; valid architectures: {valid}")
    arch = ARCHITECTURES[name]
    kwargs = {k: v for k, v in config.items() if k != "architecture"}
    unknown = sorted(set(kwargs) - set(arch.hints))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown} for {arch.describe()}")
    missing = sorted(set(arch.hints) - set(kwargs) - set(arch.defaults))
    if missing:
        raise ConfigError(f"missing argument(s) {missing} for {arch.describe()}")
    for key, value in kwargs.items():
        if not _matches(value, arch.hints[key]):
            raise ConfigError(
                f"argument {key!r} of {name} must be {_type_name(arch.hints[key])}, got {value!r}"
            )
        items = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int) and abs(v) > MAX_SIZE for v in items):
            raise ConfigError(f"argument {key!r} of {name} is over the limit of {MAX_SIZE}")
        layers = len(items) if isinstance(value, list | tuple) else 0
        if key == "n_layers":
            layers = value
        if layers > MAX_LAYERS:
            raise ConfigError(
                f"argument {key!r} of {name} asks for {layers} layers, over the limit of "
                f"{MAX_LAYERS}"
            )
    return arch, kwargs


def build(config: Mapping[str, Any]) -> nn.Module:
    """Build the module a config describes; weights come from the global torch RNG.

    Raises :class:`ConfigError` (a ``ValueError``) naming the unknown architecture or the
    unknown, missing or badly-typed argument, with the valid choices.
    """
    arch, kwargs = _resolve(config)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return arch.factory(**kwargs)


def _arguments(config: Mapping[str, Any]) -> tuple[Architecture, dict[str, Any]]:
    arch, kwargs = _resolve(config)
    return arch, {**arch.defaults, **kwargs}


def input_shape(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The per-example input shape the architecture is built for (nothing is allocated):
    ``(features,)``, ``(in_channels, image_size, image_size)`` or ``(context_length,)``."""
    arch, args = _arguments(config)
    if arch.input_kind == "tokens":
        return (args["context_length"],)
    if arch.input_kind == "image":
        return (args["in_channels"], args["image_size"], args["image_size"])
    return (args["widths"][0] if "widths" in args else args["in_features"],)


def example_input(
    config: Mapping[str, Any], batch_size: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """A random input batch of the shape (:func:`input_shape`) and dtype the architecture
    expects."""
    arch, args = _arguments(config)
    shape = (batch_size, *input_shape(config))
    if arch.input_kind == "tokens":
        return torch.randint(0, args["vocab_size"], shape, generator=generator)
    return torch.rand(shape, generator=generator)


def _positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"argument {key!r} of {name} must be >= 1, got {value}")


def _check_width(name: str, width: float) -> None:
    if not width > 0:
        raise ConfigError(f"argument 'width' of {name} must be > 0, got {width!r}")


def _scaled(channels: int, width: float) -> int:
    scaled = max(1, round(channels * width))
    if scaled > MAX_SIZE:
        raise ConfigError(f"argument 'width' ({width!r}) scales {channels} to over {MAX_SIZE}")
    return scaled


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


@register("logistic_regression", "flat")
def logistic_regression(*, in_features: int, num_classes: int = 2) -> nn.Module:
    """Affine map to logits. ``num_classes=2`` gives ONE logit (binary logistic
    regression, use loss ``"bce"`` with 0/1 targets); ``num_classes > 2`` gives one logit
    per class (multinomial, loss ``"cross_entropy"``)."""
    _positive("logistic_regression", in_features=in_features)
    if num_classes < 2:
        raise ConfigError(
            f"argument 'num_classes' of logistic_regression must be >= 2, got {num_classes}"
        )
    return nn.Linear(in_features, 1 if num_classes == 2 else num_classes)


def _dense_stack(widths: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@register("mlp", "flat")
def mlp(
    *,
    in_features: int,
    out_features: int,
    hidden: list[int] = [32, 32],  # noqa: B006 -- read-only default, shown in errors
    activation: Activation = "relu",
) -> nn.Module:
    """Fully connected ``in -> hidden... -> out`` with ``activation`` between layers and
    raw outputs (logits for classification, values for regression)."""
    _positive("mlp", in_features=in_features, out_features=out_features)
    _positive("mlp", **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    return _dense_stack([in_features, *hidden, out_features], activation)


@register("autoencoder", "flat")
def autoencoder(
    *,
    widths: list[int] = [784, 1000, 500, 250, 30, 250, 500, 1000, 784],  # noqa: B006
    activation: Activation = "sigmoid",
) -> nn.Module:
    """The paper's deep autoencoder: dense layers through ``widths`` with ``activation``
    between them and raw outputs (reconstruction logits, e.g. for loss ``"bce"``)."""
    if len(widths) < 2:
        raise ConfigError(f"argument 'widths' of autoencoder needs >= 2 entries, got {widths}")
    _positive("autoencoder", **{f"widths[{i}]": w for i, w in enumerate(widths)})
    return _dense_stack(widths, activation)


def _check_image(
    name: str, in_channels: int, image_size: int, num_classes: int, width: float
) -> None:
    _positive(name, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    _check_width(name, width)


@register("lenet", "image")
def lenet(
    *, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """LeNet-5: 5×5 conv (padding 2) and 5×5 conv (no padding), each with ReLU and 2×2
    max-pool, then dense 120-84-classes; channel/unit counts are multiplied by ``width``
    (61,706 parameters on 28×28 MNIST at ``width=1``)."""
    _check_image("lenet", in_channels, image_size, num_classes, width)
    if image_size < 12:
        raise ConfigError(f"argument 'image_size' of lenet must be >= 12, got {image_size}")
    c1, c2 = _scaled(6, width), _scaled(16, width)
    flat = c2 * ((image_size // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, _scaled(120, width)),
        nn.ReLU(),
        nn.Linear(_scaled(120, width), _scaled(84, width)),
        nn.ReLU(),
        nn.Linear(_scaled(84, width), num_classes),
    )


@register("alexnet", "image")
def alexnet(
    *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """CIFAR-sized AlexNet: five 3×3 conv layers (64-192-384-256-256 channels × ``width``)
    with ReLU and three 2×2 max-pools, then dense 1024-1024-classes (× ``width``)."""
    _check_image("alexnet", in_channels, image_size, num_classes, width)
    if image_size < 8:
        raise ConfigError(f"argument 'image_size' of alexnet must be >= 8, got {image_size}")
    c = [_scaled(k, width) for k in (64, 192, 384, 256, 256)]
    hidden = _scaled(1024, width)
    return nn.Sequential(
        nn.Conv2d(in_channels, c[0], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c[0], c[1], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c[1], c[2], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c[2], c[3], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c[3], c[4], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c[4] * (image_size // 8) ** 2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register("vgg13", "image")
def vgg13(
    *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """VGG-13 for CIFAR: ten 3×3 conv layers (64,64,128,128,256,256,512,512,512,512 ×
    ``width``, no bias), each followed by GroupNorm (not BatchNorm: deterministic in θ) and ReLU,
    a 2×2 max-pool after every pair while the feature map is ≥ 2 pixels, then one linear
    classifier."""
    _check_image("vgg13", in_channels, image_size, num_classes, width)
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for stage in (64, 128, 256, 512, 512):
        out = _scaled(stage, width)
        for _ in range(2):
            conv = nn.Conv2d(channels, out, 3, padding=1, bias=False)  # GroupNorm has the shift
            layers += [conv, _group_norm(out), nn.ReLU()]
            channels = out
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """Two 3×3 conv + GroupNorm layers with a residual (1×1 conv projection if needed)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _group_norm(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@register("resnet20", "image")
def resnet20(
    *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3×3 stem, three stages of three basic blocks with
    16, 32, 64 channels (× ``width``; stride 2 entering stages 2 and 3), global average
    pool, linear classifier. GroupNorm replaces BatchNorm so the network is a
    deterministic function of θ; projection shortcuts are 1×1 conv + GroupNorm."""
    _check_image("resnet20", in_channels, image_size, num_classes, width)
    c = [_scaled(k, width) for k in (16, 32, 64)]
    blocks: list[nn.Module] = []
    channels = c[0]
    for stage, out in enumerate(c):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            blocks.append(_BasicBlock(channels, out, stride))
            channels = out
    return nn.Sequential(
        nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False),
        _group_norm(c[0]),
        nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, d_head]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class _DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TransformerLM(nn.Module):
    """Decoder-only pre-LayerNorm transformer: token + learned position embeddings,
    causal multi-head self-attention blocks, final LayerNorm, untied output head."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(context_length, d_model)
        self.blocks = nn.Sequential(
            *(_DecoderBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[-1]
        if t > self.context_length:
            raise ValueError(f"sequence length {t} exceeds context_length {self.context_length}")
        x = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        return self.head(self.norm(self.blocks(x)))


@register("transformer_lm", "tokens")
def transformer_lm(
    *,
    vocab_size: int,
    context_length: int,
    d_model: int = 256,
    n_layers: int = 2,
    n_heads: int = 2,
    d_ff: int | None = None,
) -> nn.Module:
    """Decoder-only language model; int64 tokens ``[B, T]`` -> logits ``[B, T, vocab]``.
    ``d_ff`` (feed-forward width) defaults to ``4 * d_model``."""
    _positive(
        "transformer_lm",
        vocab_size=vocab_size,
        context_length=context_length,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
    )
    if d_model % n_heads:
        raise ConfigError(
            f"argument 'd_model' of transformer_lm ({d_model}) must be divisible by "
            f"'n_heads' ({n_heads})"
        )
    d_ff = 4 * d_model if d_ff is None else d_ff
    _positive("transformer_lm", d_ff=d_ff)
    return TransformerLM(vocab_size, context_length, d_model, n_layers, n_heads, d_ff)
