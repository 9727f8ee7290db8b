"""Allocate a waiting CPU server's parameter memory before its first weights arrive.

With ``--wait-for-initial-weights`` the dummy fill is skipped (hooks.py), so the parameters' pages are not
allocated until the first push writes them: on CPU that push pays a page fault per page inside the hand-over
(1.7 s for 1 GB on a 2-core VM, against 0.1 s for the same push once the pages exist). A background thread asks
the kernel to allocate them while the server finishes starting (``madvise(MADV_POPULATE_WRITE)``): it changes no
value (a page not yet present reads as zeros either way), so it does not write the model and needs no lock.
GPU memory is resident from allocation: nothing to do there.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time

import torch

logger = logging.getLogger("sglang_ckpt_plugin")

MADV_POPULATE_WRITE = 23  # Linux 5.14+
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def cpu_ranges(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Page-aligned (start, length) of every CPU parameter's and buffer's storage, overlaps merged."""
    spans = set()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        spans.add((start - start % PAGE, end + (-end) % PAGE))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


def populate(ranges: list[tuple[int, int]]) -> tuple[int, str]:
    """Allocate the pages of ``ranges``; returns (bytes done, the reason it stopped early or "")."""
    done = 0
    for start, length in ranges:
        if _libc.madvise(start, length, MADV_POPULATE_WRITE) != 0:
            errno = ctypes.get_errno()
            return done, f"madvise(MADV_POPULATE_WRITE): {errno} (kernel older than 5.14?)"
        done += length
    return done, ""


def populate_in_background(model: torch.nn.Module) -> threading.Thread | None:
    ranges = cpu_ranges(model)
    if not ranges:
        return None

    def run() -> None:
        t0 = time.perf_counter()
        done, problem = populate(ranges)
        if problem:
            logger.info("parameter memory not allocated ahead of the first push: %s", problem)
        else:
            logger.info(
                "allocated %.3f GB of parameter memory for the first push in %.3f s",
                done / 1e9,
                time.perf_counter() - t0,
            )

    thread = threading.Thread(target=run, name="ckpt-prefault", daemon=True)
    thread.start()
    return thread
