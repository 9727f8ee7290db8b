"""Integrity: per-tensor digests (verified by the server before it loads a bucket: xxh3-64 of host memory, or the
word sums a GPU computes in place, word_sums.py) and the
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


def new_hasher(checksum: str):
    """A streaming digest of one tensor's bytes (``update`` / ``intdigest``) of the update's checksum kind:
    ``xxh3`` (the server checks host memory) or ``wordsum`` (it checks GPU memory where it is: word_sums.py)."""
    if checksum == "wordsum":
        from .word_sums import WordSums

        return WordSums()
    return xxhash.xxh3_64()


def host_checksum(checksum: str, data) -> int:
    """One tensor's digest of the given kind, from bytes in host memory."""
    if checksum == "wordsum":
        from .word_sums import host_digest

        return host_digest(data)
    return bytes_digest(data)


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
