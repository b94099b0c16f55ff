"""Safe checkpoints: a safetensors file of weights with the JSON config in its metadata.

Format: tensors = ``model.state_dict()`` (names as PyTorch gives them); metadata
``{"format": "influence-service/checkpoint", "version": "1", "config": <JSON config>}``.
Loading validates the file structure before deserialising (see
:mod:`models.safetensors_io`), then requires the key set, shapes and dtypes to equal
those of ``build(config).state_dict()`` exactly and every value to be finite.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from models.architectures import build
from models.errors import CheckpointError, ConfigError
from models.safetensors_io import (
    DEFAULT_MAX_BYTES,
    parse_json,
    read_bytes,
    read_file,
    write_file,
)

__all__ = [
    "build_skeleton",
    "canonical_json",
    "check_state_dict",
    "checkpoint_id",
    "load_checkpoint",
    "load_checkpoint_bytes",
    "nonfinite",
    "save_checkpoint",
    "tensor_digest",
]

FORMAT = "influence-service/checkpoint"
VERSION = "1"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed and stored."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def tensor_digest(hasher: Any, tensors: Mapping[str, Tensor]) -> None:
    """Feed each tensor's name, dtype, shape and raw bytes, in sorted name order."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        hasher.update(canonical_json([name, str(t.dtype), list(t.shape)]).encode())
        hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def nonfinite(tensor: Tensor) -> str | None:
    """``None`` if every value is finite, else e.g. ``"NaN values (first at index 3)"``;
    the index is along the first dimension."""
    if not tensor.is_floating_point():
        return None
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    if tensor.dim() == 0:
        return f"{kind} values"
    first = int(bad.reshape(len(tensor), -1).any(1).nonzero()[0])
    return f"{kind} values (first at index {first})"


def checkpoint_id(model: nn.Module, config: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical config JSON followed by every weight tensor."""
    hasher = hashlib.sha256(canonical_json(dict(config)).encode())
    tensor_digest(hasher, model.state_dict())
    return hasher.hexdigest()


def check_state_dict(
    expected: Mapping[str, Tensor],
    got: Mapping[str, Tensor],
    what: str,
    error: type[ValueError],
    *,
    dtypes: bool = True,
) -> None:
    """Strict comparison of key set, shapes and (unless ``dtypes=False``, for weights that
    will be cast) dtypes; all values must be finite."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise error(f"{what}: missing tensor(s) {missing}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise error(f"{what}: unexpected tensor(s) {extra} not in the architecture")
    for name in sorted(expected):
        want, have = expected[name], got[name]
        if have.shape != want.shape:
            raise error(
                f"{what}: tensor {name!r} has shape {list(have.shape)}, expected {list(want.shape)}"
            )
        if dtypes and have.dtype != want.dtype:
            raise error(f"{what}: tensor {name!r} has dtype {have.dtype}, expected {want.dtype}")
        bad = nonfinite(have)
        if bad:
            raise error(f"{what}: tensor {name!r} contains {bad}")


def build_skeleton(config: Any, what: str, error: type[ValueError] = CheckpointError) -> nn.Module:
    """``build(config)`` on the meta device: shapes and dtypes, no storage, no init cost.

    Load weights into it with ``load_state_dict(..., assign=True)``.
    """
    try:
        with torch.device("meta"):
            return build(config)
    except ConfigError as exc:
        raise error(f"{what}: invalid config: {exc}") from None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: Mapping[str, Any]) -> None:
    """Write ``model``'s weights and ``config`` as a checkpoint (validated first)."""
    config = dict(config)
    state = model.state_dict()
    check_state_dict(
        build_skeleton(config, "model").state_dict(),
        state,
        "model does not match its config",
        CheckpointError,
    )
    metadata = {"format": FORMAT, "version": VERSION, "config": canonical_json(config)}
    write_file(path, dict(state), metadata)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _from_tensors(
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    config: Mapping[str, Any] | None,
    what: str,
) -> tuple[nn.Module, dict[str, Any]]:
    embedded = None
    if "config" in metadata:
        try:
            embedded = parse_json(metadata["config"])
        except ValueError as exc:
            raise CheckpointError(f"{what}: metadata 'config' is not valid JSON ({exc})") from None
        if not isinstance(embedded, dict):
            raise CheckpointError(
                f"{what}: metadata 'config' must be a JSON object, got {_json_type(embedded)}"
            )
    if config is None and embedded is None:
        raise CheckpointError(f"{what}: no config given and none in the file's metadata")
    if config is not None:
        try:
            config = json.loads(canonical_json(dict(config)))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{what}: config is not a JSON object ({exc})") from None
        if embedded is not None and config != embedded:
            raise CheckpointError(f"{what}: the given config differs from the one in the file")
    config = dict(config if config is not None else embedded)
    model = build_skeleton(config, what)
    check_state_dict(model.state_dict(), tensors, what, CheckpointError)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval(), config


def load_checkpoint_bytes(
    data: bytes, config: Mapping[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Validate and load a checkpoint from memory -> ``(model in eval mode, config)``.

    ``config`` may be given separately (an upload of weights + config JSON); if the file
    also embeds one, the two must be equal. Every problem raises :class:`CheckpointError`.
    """
    tensors, metadata = read_bytes(data, "checkpoint", CheckpointError)
    return _from_tensors(tensors, metadata, config, "checkpoint")


def load_checkpoint(
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_checkpoint_bytes` for a file no larger than ``max_bytes``."""
    what = f"checkpoint {os.fspath(path)!r}"
    tensors, metadata = read_file(path, what, CheckpointError, max_bytes)
    return _from_tensors(tensors, metadata, config, what)
