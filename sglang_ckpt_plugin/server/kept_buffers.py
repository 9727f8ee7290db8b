"""Bucket buffers a server rank keeps between updates (``--keep-update-buffers``).

A one-shot loader is a fresh process: every run allocated fresh shared memory and faulted every page in, on both
sides (1.4 s for 1 GB where SGLang's disk reload takes 0.15 s; docs/bench-runs/node_bench-2026-12-05.txt). A rank
that keeps its buffers holds one unnamed shared-memory file (O_TMPFILE on /dev/shm: no name, nothing to leak when
the process dies), allocated and mapped once (while the server waits for its first weights, where it does), and
lends ranges of it to one update at a time: the loader fills them through the descriptor the rank hands it
(fdpass.send_fds_to), the rank reads them through the mapping it has had since. A staged update holds them until
it is committed or dropped; meanwhile another update's request is declined and its loader allocates its own.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time

import torch

from ..transport.handles import SHM_DIR, MappedBuffer, read_only_view
from . import prefault
from . import sglang_compat as sg
from .options import KEEP_BUFFERS_ENV as KEEP_ENV

logger = logging.getLogger("sglang_ckpt_plugin")

PAGE = mmap.PAGESIZE


class BuffersBusy(RuntimeError):
    """Another update holds the kept buffers (a staged one, until it is committed or dropped)."""


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Page-aligned offsets of buffers of ``sizes`` in one file (any rank maps a range from its offset), and the
    file size they need."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += size + (-size) % PAGE
    return offsets, end


def file_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class KeptBuffers:
    """One rank's kept buffer file; lent to one holder at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._retired: list[mmap.mmap] = []  # outgrown mappings a view still uses: closed when it is gone
        self.nbytes = 0
        self.identity: tuple[int, int] | None = None
        self.holder: object | None = None

    def reserve(self, nbytes: int) -> None:
        """Allocate and map at least ``nbytes`` now (so no update pays for it)."""
        with self._lock:
            if nbytes > self.nbytes:
                self._grow(nbytes)

    def lend(self, sizes: list[int], holder: object) -> tuple[int, list[int]]:
        """(the file's descriptor, each buffer's offset), lent to ``holder`` until ``give_back(holder)``."""
        with self._lock:
            if self.holder is not None:
                held = getattr(self.holder, "update_id", None) or "another update"
                raise BuffersBusy(f"the kept update buffers are held by {held} (staged, not yet committed or dropped)")
            offsets, nbytes = layout(sizes)
            if nbytes > self.nbytes:
                self._grow(nbytes)
            self.holder = holder
            return self._fd, offsets

    def give_back(self, holder: object) -> None:
        with self._lock:
            if self.holder is holder:
                self.holder = None

    def retire(self) -> None:
        """Never lend the present file again (a model kept a view into it); the next update gets a new one."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._retired.append(self._map)
            self._close_retired()
            self._fd, self._map, self.nbytes, self.identity = None, None, 0, None

    def is_this_file(self, fd: int) -> bool:
        return self.identity is not None and file_identity(fd) == self.identity

    def view(self, offset: int, nbytes: int) -> MappedBuffer:
        """A read-only view of a lent range through the rank's own mapping (its pages mapped long ago); closing it
        leaves the mapping in place."""
        if offset % PAGE or not 0 <= offset <= offset + nbytes <= self.nbytes:
            raise ValueError(f"refusing kept-buffer range [{offset}, {offset + nbytes}) of a {self.nbytes}-byte file")
        return MappedBuffer(read_only_view(memoryview(self._map)[offset : offset + nbytes]))

    def _grow(self, nbytes: int) -> None:
        """Extend the file (its pages so far stay: only the new ones are allocated) and map all of it again."""
        t0 = time.perf_counter()
        fd = self._fd if self._fd is not None else os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # a full /dev/shm fails here, not mid-update
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            if fd != self._fd:
                os.close(fd)
            raise
        _done, problem = prefault.populate([(_address(mapping), nbytes)])  # this rank's page tables, once
        if self._map is not None:
            self._retired.append(self._map)
        self._close_retired()
        grown = nbytes - self.nbytes
        self._fd, self._map, self.nbytes, self.identity = fd, mapping, nbytes, file_identity(fd)
        logger.info(
            "kept update buffers: %.1f MB (%.1f MB more) in %.3f s%s",
            nbytes / 1e6,
            grown / 1e6,
            time.perf_counter() - t0,
            f" (pages mapped on first use: {problem})" if problem else "",
        )

    def _close_retired(self) -> None:
        still = []
        for m in self._retired:
            try:
                m.close()
            except BufferError:  # a view of it lives on (a model that kept a tensor it was given)
                still.append(m)
        self._retired = still


def _address(mapping: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


_kept: KeptBuffers | None = None
_kept_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(KEEP_ENV) == "1"


def kept_buffers() -> KeptBuffers | None:
    """This process's kept buffers, where the server was started with ``--keep-update-buffers``."""
    global _kept
    if not enabled():
        return None
    with _kept_lock:
        if _kept is None:
            _kept = KeptBuffers()
        return _kept


def reserve_for_first_push(model: torch.nn.Module) -> threading.Thread | None:
    """While the server waits for its first weights, on the rank a one-process loader asks (TP rank 0): buffers of
    about the checkpoint's size (this rank's parameters times the TP size), allocated in the background."""
    kept = kept_buffers()
    if kept is None:
        return None
    tp_rank, tp_size = sg.tp_rank_and_size()
    nbytes = tp_size * sum(t.nbytes for t in model.parameters() if t.device.type == "cpu")
    if tp_rank != 0 or nbytes <= 0:
        return None
    thread = threading.Thread(target=kept.reserve, args=(nbytes,), name="ckpt-kept-buffers", daemon=True)
    thread.start()
    return thread
