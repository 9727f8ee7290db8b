"""Metas files: the read plan of a checkpoint as JSON (never pickle), so a later loader can join without
re-reading every header. Each tensor records the loader rank that reads it.

Files are recorded relative to the checkpoint directory; a loader that reads a metas file accepts only files
inside that directory (or the one given with ``--checkpoint-path``) and byte ranges inside those files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..transport.messages import WIRE_DTYPE_ITEMSIZE
from .checkpoint import CheckpointError, TensorInfo, inside

METAS_FORMAT = "sglang-ckpt-metas/2"


def save_metas(
    path: str | Path, checkpoint_name: str, shards: list[list[TensorInfo]], checkpoint_dir: str | Path
) -> None:
    root = Path(checkpoint_dir).resolve()
    root = root.parent if root.is_file() else root
    tensors = [
        {
            "name": t.name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "file": os.path.relpath(Path(t.file).resolve(), root),
            "file_offset": t.file_offset,
            "nbytes": t.nbytes,
            "owner": rank,
        }
        for rank, shard in enumerate(shards)
        for t in shard
    ]
    doc = {
        "format": METAS_FORMAT,
        "checkpoint_name": checkpoint_name,
        "checkpoint_dir": str(root),
        "world_size": len(shards),
        "tensors": tensors,
    }
    Path(path).write_text(json.dumps(doc))


def load_metas(path: str | Path, checkpoint_dir: str | Path | None = None) -> tuple[str, list[list[TensorInfo]]]:
    """(checkpoint name, tensors per owner rank) from a metas file; CheckpointError if it is not one, or if it
    names a file outside the checkpoint directory or a byte range outside its file."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != METAS_FORMAT:
            raise CheckpointError(f"{path} is not a metas file ({METAS_FORMAT}); write one with --save-metas-file")
        root = Path(checkpoint_dir or doc["checkpoint_dir"]).resolve()
        root = root.parent if root.is_file() else root
        sizes: dict[str, int] = {}
        shards: list[list[TensorInfo]] = [[] for _ in range(int(doc["world_size"]))]
        for t in doc["tensors"]:
            dtype = t["dtype"]
            if dtype not in WIRE_DTYPE_ITEMSIZE:
                raise CheckpointError(f"{path}: unknown dtype {dtype!r}")
            file = inside(root, str(t["file"]), what=f"{path}: tensor {t['name']!r}")
            shape = tuple(int(d) for d in t["shape"])
            offset, nbytes = int(t["file_offset"]), int(t["nbytes"])
            if file not in sizes:
                sizes[file] = os.stat(file).st_size
            if (
                any(d < 0 for d in shape)
                or nbytes != math.prod(shape) * WIRE_DTYPE_ITEMSIZE[dtype]
                or offset < 0
                or offset + nbytes > sizes[file]
            ):
                raise CheckpointError(
                    f"{path}: tensor {t['name']!r} ({nbytes} bytes at {offset}) does not fit its "
                    f"shape {list(shape)} or its file ({sizes[file]} bytes)"
                )
            shards[int(t["owner"])].append(TensorInfo(t["name"], dtype, shape, file, offset, nbytes))
    except OSError as exc:
        raise CheckpointError(f"cannot read metas file {path} or a file it names: {exc}") from exc
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"metas file {path} is malformed: {exc!r}") from exc
    return doc["checkpoint_name"], shards
