"""Validated safetensors reading and writing, shared by checkpoints, datasets and runs.

A safetensors file is ``u64 little-endian header length N | N bytes of JSON header |
data``; the header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` and
may hold ``"__metadata__"`` (str -> str). Everything about the file is checked here
before the ``safetensors`` library deserialises a byte of it, and pickle or zip
(``torch.save``) payloads are refused by their magic bytes: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_HEADER_BYTES",
    "parse_json",
    "read_bytes",
    "read_file",
    "write_file",
]

MAX_HEADER_BYTES = 16 * 2**20
DEFAULT_MAX_BYTES = 2 * 2**30


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` of untrusted text; every way it can be malformed (bad syntax, bytes
    that are not UTF-8, nesting deeper than the parser's recursion limit, integers over
    Python's 4300-digit conversion limit) is a ``ValueError`` with a short reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, or an integer too long to convert
        raise ValueError(str(exc).split(";")[0]) from None


_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80


def _refuse_foreign_formats(data: bytes, what: str, error: type[ValueError]) -> None:
    if data.startswith(_ZIP_MAGIC):
        raise error(
            f"{what} is a zip archive (a torch.save / .pt file?), not safetensors; refused "
            "without loading it"
        )
    is_pickle = data[0] == _PICKLE_PROTOCOL_OPCODE and 1 <= data[1] <= 5
    if is_pickle and data[8:9] != b"{":
        raise error(f"{what} is a Python pickle, not safetensors; refused without unpickling it")


def _parse_header(data: bytes, what: str, error: type[ValueError]) -> dict:
    if len(data) < 8:
        raise error(f"{what} is {len(data)} bytes, too short for a safetensors header (8 bytes)")
    _refuse_foreign_formats(data, what, error)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise error(
            f"{what}: header length {header_len} exceeds the cap of {MAX_HEADER_BYTES} bytes"
        )
    if 8 + header_len > len(data):
        raise error(
            f"{what}: truncated header: it declares {header_len} bytes but only "
            f"{len(data) - 8} follow"
        )
    try:
        header = parse_json(data[8 : 8 + header_len])
    except ValueError as exc:
        raise error(f"{what}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise error(f"{what}: header must be a JSON object, got {type(header).__name__}")
    _check_entries(header, len(data) - 8 - header_len, what, error)
    return header


def _check_entries(header: dict, data_len: int, what: str, error: type[ValueError]) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise error(f"{what}: header '__metadata__' must map strings to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise error(
                f"{what}: header entry for tensor {name!r} must have exactly "
                "'dtype', 'shape' and 'data_offsets'"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise error(f"{what}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise error(f"{what}: tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise error(f"{what}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        if end - begin != expected:
            raise error(
                f"{what}: tensor {name!r} with dtype {dtype} and shape {shape} needs "
                f"{expected} bytes but its data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise error(
                f"{what}: data of tensor {name!r} starts at byte {begin}, expected {position}"
            )
        position = end
    if position != data_len:
        problem = "truncated data" if position > data_len else "trailing bytes after the data"
        raise error(
            f"{what}: {problem}: the header describes {position} data bytes but the file "
            f"holds {data_len}"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_bytes(
    data: bytes, what: str, error: type[ValueError]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Validate a safetensors buffer, then load it: ``(tensors, metadata)``.

    Any problem raises ``error`` (e.g. ``CheckpointError``) with ``what`` in the message.
    """
    data = bytes(data)
    header = _parse_header(data, what, error)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the library's own checks, after ours passed
        raise error(f"{what}: safetensors could not decode the file ({exc})") from None
    return tensors, dict(header.get("__metadata__", {}))


def read_file(
    path: str | os.PathLike, what: str, error: type[ValueError], max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """:func:`read_bytes` for a file, refusing files larger than ``max_bytes`` unread."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise error(f"{what}: file is {size} bytes, over the cap of {max_bytes} bytes")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{what}: cannot read {os.fspath(path)} ({exc.strerror})") from None
    if len(data) > max_bytes:  # grew while we read it
        raise error(f"{what}: file is over the cap of {max_bytes} bytes")
    return read_bytes(data, what, error)


def write_file(
    path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> None:
    """Write tensors atomically (temporary file + rename) as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        plain[name] = tensor.clone() if pointer in seen else tensor  # safetensors refuses aliases
        seen.add(pointer)
    blob = safetensors.torch.save(plain, metadata=metadata)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
