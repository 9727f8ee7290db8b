"""Discover a safetensors checkpoint and describe every tensor in it without reading any data.

We parse the safetensors header ourselves (8-byte little-endian length + JSON) instead of going through
``safe_open``: the loader needs each tensor's byte range in its file so that it can ``readinto`` the bytes
straight into a shared bucket (one copy, no mmap of the whole file in the loader's resident memory).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from ..transport.messages import DRAFT_PREFIX, WIRE_DTYPE_ITEMSIZE

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

# safetensors dtype tag -> dtype name as torch spells it, which the wire protocol uses (its bytes per element:
# WIRE_DTYPE_ITEMSIZE). Plain data: planning a push needs no torch (the one-rank CPU path never imports it).
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class CheckpointError(ValueError):
    """The checkpoint on disk cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # torch's name without "torch." (``dtype_name``), as on the wire
    shape: tuple[int, ...]
    file: str
    file_offset: int  # absolute offset of the first data byte in ``file``
    nbytes: int

    @property
    def itemsize(self) -> int:
        numel = math.prod(self.shape)
        return self.nbytes // numel if numel else WIRE_DTYPE_ITEMSIZE.get(self.dtype, 1)


def dtype_name(dtype) -> str:
    """A torch dtype's name as TensorInfo and the wire protocol spell it (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def inside(root: Path, name: str, what: str) -> str:
    """``root / name`` if that is a file inside ``root`` (no ``..``, no absolute path, no symlink out of it)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}: file name {name!r} is not a relative path")
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root.resolve()):
        raise CheckpointError(f"{what} names {name!r}, outside the checkpoint directory {str(root)!r}; refusing it")
    return str(path)


def discover_files(checkpoint_path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's files if there is one, else every *.safetensors."""
    root = Path(checkpoint_path)
    if not root.exists():
        raise CheckpointError(f"checkpoint path {str(root)!r} does not exist; pass --checkpoint-path DIR")
    if root.is_file():
        if root.suffix != ".safetensors":
            raise CheckpointError(f"{str(root)!r} is not a .safetensors file")
        return [root]
    index = root / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = sorted({Path(inside(root, name, what=f"{index}")) for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names files that do not exist: {missing[:3]}; re-copy the checkpoint")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {str(root)!r}; is this a safetensors checkpoint directory?")
    return files


def read_header(file: Path) -> list[TensorInfo]:
    """Describe every tensor of one safetensors file, validating the header against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"{file} has a corrupt or truncated header (says {header_len} bytes, file {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{file} has a corrupt header: not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt header: not a JSON object")
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors.append(_tensor_info(file, name, entry, data_start, size))
    return tensors


def _tensor_info(file: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: header entry for {name!r} is malformed ({exc!r})") from exc
    expected = math.prod(shape) * WIRE_DTYPE_ITEMSIZE[dtype]
    if any(d < 0 for d in shape) or begin < 0 or end - begin != expected:
        raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes, shape {shape} needs {expected}")
    if data_start + end > file_size:
        raise CheckpointError(f"{file} is truncated: tensor {name!r} ends past the end of the file")
    return TensorInfo(name, dtype, shape, str(file), data_start + begin, expected)


def read_checkpoint(checkpoint_path: str | Path) -> list[TensorInfo]:
    """All tensors of a checkpoint, in file order (sequential reads), with unique names."""
    tensors: list[TensorInfo] = []
    seen: dict[str, str] = {}
    for file in discover_files(checkpoint_path):
        for info in sorted(read_header(file), key=lambda t: t.file_offset):
            if info.name in seen:
                raise CheckpointError(f"tensor {info.name!r} appears in both {seen[info.name]} and {info.file}")
            seen[info.name] = info.file
            tensors.append(info)
    if not tensors:
        raise CheckpointError(f"checkpoint {str(checkpoint_path)!r} holds no tensors")
    return tensors


def read_update(checkpoint_path: str | Path, draft_checkpoint_path: str | Path | None = None) -> list[TensorInfo]:
    """Every tensor one update carries: the checkpoint's, then (``--draft-checkpoint-path``) the draft model's own
    checkpoint's, each named ``draft.<name>`` so that the server hands them to the draft (both move together)."""
    tensors = read_checkpoint(checkpoint_path)
    if draft_checkpoint_path:
        tensors += [replace(t, name=DRAFT_PREFIX + t.name) for t in read_checkpoint(draft_checkpoint_path)]
    return tensors
