"""Integrity: per-tensor xxh3-64 digests (verified by the server before it loads a bucket) and the
checkpoint fingerprint both sides report, so a user can check the server holds exactly the bytes on disk.

fingerprint = xxh3-64 over the lines ``<name> <dtype> <shape> <digest hex>\\n`` sorted by name: independent of
file layout, bucket size and loader rank count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    import torch


def tensor_digest(flat_bytes: torch.Tensor) -> int:
    """xxh3-64 of a CPU uint8 tensor's bytes (zero-copy through the buffer protocol)."""
    return bytes_digest(memoryview(flat_bytes.numpy()))


def bytes_digest(data) -> int:
    """xxh3-64 of any bytes-like object (the same value tensor_digest gives for the same bytes)."""
    return xxhash.xxh3_64_intdigest(data)


def fingerprint(entries: dict[str, tuple[str, list[int], int]]) -> str:
    """``entries``: name -> (dtype name, shape, digest)."""
    h = xxhash.xxh3_64()
    for name in sorted(entries):
        dtype, shape, digest = entries[name]
        h.update(f"{name} {dtype} {list(shape)} {digest:016x}\n".encode())
    return h.hexdigest()


class Fingerprint:
    """Collects per-tensor digests as they pass (loader: after reading; rank: after checking)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, list[int], int]] = {}

    def add(self, name: str, dtype: str, shape, digest: int) -> None:
        self.entries[name] = (dtype, list(shape), digest)

    def hexdigest(self) -> str:
        return fingerprint(self.entries)
