"""Strings (names, keys, endpoints, small JSON documents) through torch.distributed collectives, as byte tensors:
nothing is pickled. Each call first agrees on the longest encoding (one int64 collective), so any length fits.
Used by the loader's control group and by the server's TP group alike."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _encode(data: bytes, size: int) -> torch.Tensor:
    buf = torch.zeros(size, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor) -> str:
    return bytes(buf.tolist()).rstrip(b"\0").decode()


def all_gather_str(text: str, group, world_size: int) -> list[str]:
    """Every rank's ``text``, in rank order (a gloo group: the tensors stay on the CPU)."""
    data = text.encode()
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=group)
    size = max(1, max(int(n.item()) for n in lengths))
    out = [torch.zeros(size, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(out, _encode(data, size), group=group)
    return [_decode(t) for t in out]


def broadcast_str(text: str, src: int, is_src: bool, group) -> str:
    data = text.encode() if is_src else b""
    length = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(length, src=src, group=group)
    buf = _encode(data, max(1, int(length.item())))
    dist.broadcast(buf, src=src, group=group)
    return _decode(buf)
