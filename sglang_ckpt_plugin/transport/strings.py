"""Short strings (names, keys, endpoints) through torch.distributed collectives, as fixed-size byte tensors:
nothing is pickled. Used by the loader's control group and by the server's TP group alike."""

from __future__ import annotations

import torch
import torch.distributed as dist

STRING_BYTES = 256


def _encode(text: str) -> torch.Tensor:
    data = text.encode()
    if len(data) > STRING_BYTES:
        raise ValueError(f"control string too long ({len(data)} bytes): {text[:60]!r}...")
    buf = torch.zeros(STRING_BYTES, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor) -> str:
    return bytes(buf.tolist()).rstrip(b"\0").decode()


def all_gather_str(text: str, group, world_size: int) -> list[str]:
    """Every rank's ``text``, in rank order (a gloo group: the tensors stay on the CPU)."""
    out = [torch.zeros(STRING_BYTES, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(out, _encode(text), group=group)
    return [_decode(t) for t in out]


def broadcast_str(text: str, src: int, is_src: bool, group) -> str:
    buf = _encode(text) if is_src else torch.zeros(STRING_BYTES, dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=group)
    return _decode(buf)
