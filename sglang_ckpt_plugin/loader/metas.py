"""Metas files: the read plan of a checkpoint as JSON (never pickle), so a later loader can join without
re-reading every header. Each tensor records the loader rank that reads it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CheckpointError, TensorInfo, dtype_name

METAS_FORMAT = "sglang-ckpt-metas/1"


def save_metas(path: str | Path, checkpoint_name: str, shards: list[list[TensorInfo]]) -> None:
    tensors = [
        {"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "file": t.file,
         "file_offset": t.file_offset, "nbytes": t.nbytes, "owner": rank}
        for rank, shard in enumerate(shards) for t in shard
    ]  # fmt: skip
    doc = {"format": METAS_FORMAT, "checkpoint_name": checkpoint_name, "world_size": len(shards), "tensors": tensors}
    Path(path).write_text(json.dumps(doc))


def load_metas(path: str | Path) -> tuple[str, list[list[TensorInfo]]]:
    """(checkpoint name, tensors per owner rank) from a metas file; CheckpointError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != METAS_FORMAT:
            raise CheckpointError(f"{path} is not a metas file ({METAS_FORMAT}); write one with --save-metas-file")
        shards: list[list[TensorInfo]] = [[] for _ in range(int(doc["world_size"]))]
        for t in doc["tensors"]:
            dtype = getattr(torch, t["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{path}: unknown dtype {t['dtype']!r}")
            info = TensorInfo(t["name"], dtype, tuple(int(d) for d in t["shape"]), str(t["file"]),
                              int(t["file_offset"]), int(t["nbytes"]))  # fmt: skip
            shards[int(t["owner"])].append(info)
    except OSError as exc:
        raise CheckpointError(f"cannot read metas file {path}: {exc}") from exc
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"metas file {path} is malformed: {exc!r}") from exc
    return doc["checkpoint_name"], shards
