"""A per-tensor checksum that a GPU computes where the bytes are (``--verify`` into GPU buffers): no copy to the host.

xxh3 needs the bytes on the host; copying every tensor back cost 7x the push. This checksum is made of integer sums
that torch computes on the device and numpy on the loader's host bytes, with the same value:

    words w_k: the bytes as little-endian 64-bit words (the last one zero-padded), k = 0, 1, ...
    total = sum w_k      by_row = sum (k // 1024 + 1) w_k      by_col = sum (k % 1024 + 1) w_k      (all mod 2^64)
    digest = xxh3-64 of (total, by_row, by_col, nbytes) as four little-endian uint64

One changed word changes ``total``; two changes that cancel in it differ in row or column, which moves ``by_row`` or
``by_col`` (both weights are position-dependent). It is a checksum against corruption and transport bugs (a wrong
offset, a buffer reused too early), not a cryptographic hash. Every sum wraps modulo 2^64: numpy's uint64 by
definition, torch's int64 in two's complement (the same bits).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np
import xxhash

if TYPE_CHECKING:
    import torch

ROW_WORDS = 1024
MASK = (1 << 64) - 1


def finish(total: int, by_row: int, by_col: int, nbytes: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<4Q", total & MASK, by_row & MASK, by_col & MASK, nbytes))


def _sums(words: np.ndarray, first: int) -> tuple[int, int, int]:
    """(total, by_row, by_col) contributions of ``words`` (uint64) standing at word index ``first``."""
    total = by_row = by_col = 0
    n, k = len(words), first
    head = min(n, (-k) % ROW_WORDS)  # up to the next row boundary
    spans = [(0, head)]
    rows = (n - head) // ROW_WORDS
    body_end = head + rows * ROW_WORDS
    if rows:
        body = words[head:body_end].reshape(rows, ROW_WORDS)
        row_sums = body.sum(axis=1, dtype=np.uint64)
        first_row = (k + head) // ROW_WORDS
        total += int(row_sums.sum(dtype=np.uint64))
        by_row += int((row_sums * np.arange(first_row + 1, first_row + rows + 1, dtype=np.uint64)).sum(dtype=np.uint64))
        col_sums = body.sum(axis=0, dtype=np.uint64)
        by_col += int((col_sums * np.arange(1, ROW_WORDS + 1, dtype=np.uint64)).sum(dtype=np.uint64))
    spans.append((body_end, n))
    for start, end in spans:  # the partial rows: position by position
        if end > start:
            part, index = words[start:end], np.arange(k + start, k + end, dtype=np.uint64)
            total += int(part.sum(dtype=np.uint64))
            by_row += int((part * (index // ROW_WORDS + 1)).sum(dtype=np.uint64))
            by_col += int((part * (index % ROW_WORDS + 1)).sum(dtype=np.uint64))
    return total, by_row, by_col


class WordSums:
    """The checksum over bytes that arrive in pieces, in order (xxhash's ``update`` / ``intdigest``)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.words = 0  # full words summed
        self.sums = [0, 0, 0]
        self._carry = b""  # the bytes of an unfinished word

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self.nbytes += len(view)
        if self._carry:
            take = min(8 - len(self._carry), len(view))
            self._carry += bytes(view[:take])
            view = view[take:]
            if len(self._carry) < 8:
                return
            self._add(np.frombuffer(self._carry, dtype="<u8"))
            self._carry = b""
        full = len(view) // 8 * 8
        if full:
            self._add(np.frombuffer(view[:full], dtype="<u8"))
        self._carry = bytes(view[full:])

    def _add(self, words: np.ndarray) -> None:
        for i, value in enumerate(_sums(words, self.words)):
            self.sums[i] = (self.sums[i] + value) & MASK
        self.words += len(words)

    def intdigest(self) -> int:
        sums = list(self.sums)
        if self._carry:
            last = np.frombuffer(self._carry.ljust(8, b"\0"), dtype="<u8")
            sums = [(a + b) & MASK for a, b in zip(sums, _sums(last, self.words))]
        return finish(*sums, self.nbytes)


def host_digest(data) -> int:
    """The checksum of bytes in host memory (what the loader sends)."""
    sums = WordSums()
    sums.update(data)
    return sums.intdigest()


def device_digest(flat: torch.Tensor) -> int:
    """The checksum of a uint8 tensor's bytes, computed on its device (a GPU): three scalars and at most 7 bytes
    come back to the host, never the tensor."""
    import torch

    nbytes = flat.numel()
    full = nbytes // 8 * 8
    head = flat[:full]
    if full and head.storage_offset() % 8:
        head = head.clone()  # a view of int64 words needs 8-byte alignment
    words = head.view(torch.int64)
    n = words.numel()
    rows = n // ROW_WORDS
    zero = torch.zeros((), dtype=torch.int64, device=flat.device)
    total, by_row, by_col = zero, zero, zero
    if rows:
        body = words[: rows * ROW_WORDS].view(rows, ROW_WORDS)
        row_sums = body.sum(dim=1)
        total = row_sums.sum()
        by_row = (row_sums * torch.arange(1, rows + 1, dtype=torch.int64, device=flat.device)).sum()
        col_sums = body.sum(dim=0)
        by_col = (col_sums * torch.arange(1, ROW_WORDS + 1, dtype=torch.int64, device=flat.device)).sum()
    tail = words[rows * ROW_WORDS :]
    if tail.numel():  # one partial row: row index ``rows``, columns 0..
        total = total + tail.sum()
        by_row = by_row + tail.sum() * (rows + 1)
        by_col = by_col + (tail * torch.arange(1, tail.numel() + 1, dtype=torch.int64, device=flat.device)).sum()
    sums = [v & MASK for v in torch.stack([total, by_row, by_col]).tolist()]
    if nbytes > full:
        last = np.frombuffer(bytes(flat[full:].cpu().numpy()).ljust(8, b"\0"), dtype="<u8")
        sums = [(a + b) & MASK for a, b in zip(sums, _sums(last, n))]
    return finish(*sums, nbytes)
