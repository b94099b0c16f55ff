"""The bad-checkpoint corpus: every malformed or unsafe file gets a specific CheckpointError."""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import models
from models import CheckpointError

CONFIG = {"architecture": "mlp", "in_features": 6, "hidden": [4], "out_features": 3}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in models.build(CONFIG).state_dict().items()}


def _safetensors(tensors: dict[str, torch.Tensor], config: dict | None = CONFIG) -> bytes:
    metadata = {} if config is None else {"config": json.dumps(config)}
    return safetensors.torch.save(tensors, metadata=metadata)


def _valid() -> bytes:
    return _safetensors(_state())


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


class _TouchOnUnpickle:
    """Unpickling an instance opens (creates) ``path``: an armed but harmless payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _torch_save(obj: object, zipfile: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zipfile)
    return buffer.getvalue()


def _with(name: str, value: torch.Tensor) -> bytes:
    state = _state()
    state[name] = value
    return _safetensors(state)


def _without(name: str) -> bytes:
    state = _state()
    del state[name]
    return _safetensors(state)


def _raw(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


CORPUS: dict[str, tuple[Callable[[], bytes], list[str]]] = {
    "empty": (lambda: b"", ["0 bytes, too short"]),
    "short": (lambda: b"\x05\x00\x00", ["3 bytes, too short"]),
    "truncated_header": (
        lambda: _valid()[:20],
        ["truncated header", "only 12 follow"],
    ),
    "truncated_data": (lambda: _valid()[:-5], ["truncated data", "holds"]),
    "trailing_bytes": (lambda: _valid() + b"\x00" * 4, ["trailing bytes after the data"]),
    "huge_header_length": (
        lambda: struct.pack("<Q", 2**64 - 1) + b"{}",
        ["header length 18446744073709551615 exceeds the cap"],
    ),
    "header_over_cap": (
        lambda: struct.pack("<Q", 16 * 2**20 + 1) + b"{}",
        ["header length 16777217 exceeds the cap of 16777216"],
    ),
    "non_json_header": (
        lambda: struct.pack("<Q", 9) + b"{not json" + b"",
        ["header is not valid JSON"],
    ),
    "header_not_object": (lambda: _raw([1, 2]), ["header must be a JSON object, got list"]),
    "header_nested_too_deeply": (
        lambda: struct.pack("<Q", 20_000) + b"[" * 20_000,
        ["header is not valid JSON (nested too deeply)"],
    ),
    "header_integer_too_long": (
        lambda: struct.pack("<Q", 5_000) + b"1" * 5_000,
        ["header is not valid JSON (Exceeds the limit (4300 digits)"],
    ),
    "entry_missing_fields": (
        lambda: _raw({"w": {"dtype": "F32", "shape": [1]}}),
        ["entry for tensor 'w' must have exactly 'dtype', 'shape' and 'data_offsets'"],
    ),
    "bad_dtype_name": (
        lambda: _raw({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ["tensor 'w' has unsupported dtype 'OBJ'"],
    ),
    "offsets_disagree_with_shape": (
        lambda: _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        ["needs 8 bytes but its data_offsets span 4"],
    ),
    "overlapping_tensors": (
        lambda: _raw(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
        ["data of tensor 'b' starts at byte 0, expected 4"],
    ),
    "metadata_not_strings": (
        lambda: _raw({"__metadata__": {"config": {"architecture": "mlp"}}}),
        ["'__metadata__' must map strings to strings"],
    ),
    "torch_save_zip": (
        lambda: _torch_save(_state(), zipfile=True),
        ["zip archive (a torch.save / .pt file?)", "refused"],
    ),
    "torch_save_legacy_pickle": (
        lambda: _torch_save(_state(), zipfile=False),
        ["is a Python pickle", "without unpickling"],
    ),
    "missing_key": (lambda: _without("0.bias"), ["missing tensor(s) ['0.bias']"]),
    "extra_key": (
        lambda: _with("extra.weight", torch.zeros(2)),
        ["unexpected tensor(s) ['extra.weight']"],
    ),
    "wrong_shape": (
        lambda: _with("0.weight", torch.zeros(5, 6)),
        ["tensor '0.weight' has shape [5, 6], expected [4, 6]"],
    ),
    "wrong_dtype": (
        lambda: _with("2.bias", torch.zeros(3, dtype=torch.float64)),
        ["tensor '2.bias' has dtype torch.float64, expected torch.float32"],
    ),
    "nan_weight": (
        lambda: _with("2.weight", torch.full((3, 4), float("nan"))),
        ["tensor '2.weight' contains NaN"],
    ),
    "inf_weight": (
        lambda: _with("0.bias", torch.tensor([0.0, float("inf"), 0.0, 0.0])),
        ["tensor '0.bias' contains Inf"],
    ),
    "unknown_architecture": (
        lambda: _safetensors(_state(), {"architecture": "gpt5", "in_features": 6}),
        ["invalid config", "unknown architecture 'gpt5'", "valid architectures"],
    ),
    "bad_config_argument": (
        lambda: _safetensors(_state(), {**CONFIG, "hidden": "4"}),
        ["invalid config", "'hidden' of mlp must be list[int]"],
    ),
    "config_not_json": (
        lambda: safetensors.torch.save(_state(), metadata={"config": "{oops"}),
        ["metadata 'config' is not valid JSON"],
    ),
    "config_nested_too_deeply": (
        lambda: safetensors.torch.save(_state(), metadata={"config": "[" * 20_000}),
        ["metadata 'config' is not valid JSON (nested too deeply)"],
    ),
    "config_integer_too_long": (
        lambda: safetensors.torch.save(_state(), metadata={"config": "9" * 5_000}),
        ["metadata 'config' is not valid JSON (Exceeds the limit (4300 digits)"],
    ),
    "no_config": (lambda: _safetensors(_state(), None), ["no config given and none in"]),
    # a config that is valid JSON but not an object, or not a string architecture
    "config_number": (
        lambda: safetensors.torch.save(_state(), metadata={"config": "5"}),
        ["metadata 'config' must be a JSON object, got number"],
    ),
    "config_array": (
        lambda: safetensors.torch.save(_state(), metadata={"config": "[1]"}),
        ["metadata 'config' must be a JSON object, got array"],
    ),
    "config_string": (
        lambda: safetensors.torch.save(_state(), metadata={"config": '"abc"'}),
        ["metadata 'config' must be a JSON object, got string"],
    ),
    "architecture_not_string": (
        lambda: _safetensors(_state(), {**CONFIG, "architecture": ["mlp"]}),
        ["invalid config", "config 'architecture' must be a string, got list"],
    ),
    "argument_too_large": (
        lambda: _safetensors(_state(), {**CONFIG, "in_features": 10**30}),
        ["invalid config", "argument 'in_features' of mlp is over the limit of 2147483647"],
    ),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_checkpoint_from_file(case: str, tmp_path: Path) -> None:
    make, fragments = CORPUS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as info:
        models.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_checkpoint_from_bytes(case: str) -> None:
    make, fragments = CORPUS[case]
    with pytest.raises(CheckpointError) as info:
        models.load_checkpoint_bytes(make())
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (5, "config is not a JSON object"),
        ([1], "config is not a JSON object"),
        ("abc", "config is not a JSON object"),
        ({"architecture": ["mlp"]}, "config 'architecture' must be a string, got list"),
        ({"architecture": None}, "config 'architecture' must be a string, got NoneType"),
    ],
)
def test_malformed_given_config_is_a_checkpoint_error(config, fragment: str) -> None:
    # the upload form's separate config, with weights that embed none
    with pytest.raises(CheckpointError) as info:
        models.load_checkpoint_bytes(_safetensors(_state(), None), config)
    assert fragment in str(info.value)


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    armed = tmp_path / "proof_the_payload_works"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(armed)))
    assert armed.exists()  # unpickling this payload really does create a file

    marker = tmp_path / "marker"
    for protocol in (2, 3, 4, 5):
        payload = pickle.dumps(_TouchOnUnpickle(marker), protocol=protocol)
        path = tmp_path / f"evil{protocol}.safetensors"
        path.write_bytes(payload)
        with pytest.raises(CheckpointError, match="is a Python pickle"):
            models.load_checkpoint(path)
        with pytest.raises(CheckpointError, match="is a Python pickle"):
            models.load_checkpoint_bytes(payload)
        torch_payload = _torch_save({"w": _TouchOnUnpickle(marker)}, zipfile=True)
        with pytest.raises(CheckpointError, match="zip archive"):
            models.load_checkpoint_bytes(torch_payload)
    for protocol in (0, 1):  # no 0x80 opcode: refused by the header checks instead
        with pytest.raises(CheckpointError):
            models.load_checkpoint_bytes(pickle.dumps(_TouchOnUnpickle(marker), protocol))
    assert not marker.exists()


def test_header_length_with_pickle_like_first_byte_is_still_read() -> None:
    # A real header of 0x180 bytes starts with 0x80 0x01: it must not be taken for a pickle.
    state = _state()
    for width in range(300):
        metadata = {"config": json.dumps(CONFIG), "pad": "x" * width}
        data = safetensors.torch.save(state, metadata=metadata)
        if data[0] == 0x80 and 1 <= data[1] <= 5:
            break
    else:
        pytest.fail("could not produce a header length whose first byte is 0x80")
    model, loaded = models.load_checkpoint_bytes(data)
    assert loaded == CONFIG
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"])


def test_oversized_file_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(_valid())
    with pytest.raises(CheckpointError, match="over the cap of 100 bytes"):
        models.load_checkpoint(path, max_bytes=100)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        models.load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        models.load_checkpoint(tmp_path)  # a directory


def test_separate_config_is_used_and_must_agree() -> None:
    state = _state()
    bare = _safetensors(state, None)
    model, config = models.load_checkpoint_bytes(bare, CONFIG)
    assert config == CONFIG
    assert torch.equal(model.state_dict()["2.weight"], state["2.weight"])
    as_tuple = {**CONFIG, "hidden": (4,)}  # JSON-equal to the embedded config
    assert models.load_checkpoint_bytes(_valid(), as_tuple)[1] == CONFIG
    other = {**CONFIG, "activation": "tanh"}
    with pytest.raises(CheckpointError, match="given config differs from the one in the file"):
        models.load_checkpoint_bytes(_valid(), other)


def test_loaded_model_is_trainable_and_in_eval_mode() -> None:
    model, _ = models.load_checkpoint_bytes(_valid())
    assert not model.training
    params = list(model.parameters())
    assert params and all(p.requires_grad and p.device.type == "cpu" for p in params)
    model(torch.ones(2, 6)).sum().backward()
    assert all(p.grad is not None for p in params)


def test_save_refuses_a_model_that_does_not_match_its_config(tmp_path: Path) -> None:
    model = models.build({**CONFIG, "hidden": [5]})
    with pytest.raises(CheckpointError, match=r"'0.bias' has shape \[5\], expected \[4\]"):
        models.save_checkpoint(tmp_path / "x.safetensors", model, CONFIG)
    assert not (tmp_path / "x.safetensors").exists()
