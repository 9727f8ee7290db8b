"""Read checkpoint bytes: ``preadv`` straight from the file into the destination (a bucket buffer or a staging
half, filler.py).

One copy (page cache -> bucket), no whole-file mmap in the loader's resident memory. Large reads are split
over a few threads (``preadv`` releases the GIL; one thread copies from the page cache at a fraction of the
memory bandwidth: 5.5 GB/s against 55 GB/s pinned host -> H200 measured on one machine). No torch here.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .plan import Bucket

logger = logging.getLogger("sglang_ckpt_plugin")

# reads are split into pieces for the reading threads: about two per thread, within these bounds (few threads:
# fewer hand-offs; many threads: small slices that keep all of them busy to the end)
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 2 << 20, 16 << 20
# O_DIRECT reads: file offset, length and memory aligned to the device's logical block size (at most 4 KiB)
DIRECT_ALIGN = 4096
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
MAP_FAILED = ctypes.c_void_p(-1).value


def cached_bytes(fd: int, offset: int, length: int) -> int:
    """How many bytes of ``[offset, offset + length)`` of the open file are in the page cache (whole pages)."""
    start = offset - offset % PAGE
    span = offset + length - start
    if length <= 0:
        return 0
    addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap for mincore: {os.strerror(ctypes.get_errno())}")
    try:
        pages = (span + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, span, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore: {os.strerror(ctypes.get_errno())}")
        return min(length, sum(v & 1 for v in bytes(vec)) * PAGE)
    finally:
        _libc.munmap(addr, span)


READ_THREADS_ENV = "SGLANG_CKPT_READ_THREADS"
# Bytes per second one loader rank may read (suffix K/M/G), unset: no limit. For a shared filesystem that must not
# be saturated, and for the bench, which emulates slow storage with it (page-cache reads here run at GB/s).
READ_RATE_ENV = "SGLANG_CKPT_READ_RATE"


def read_rate_limit() -> float | None:
    text = os.environ.get(READ_RATE_ENV, "").strip().upper()
    if not text:
        return None
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1.0)
    try:
        rate = float(text[:-1] if text[-1] in "KMG" else text) * scale
    except ValueError:
        raise ValueError(
            f"{READ_RATE_ENV}={os.environ[READ_RATE_ENV]!r}: expected bytes per second, e.g. 200M"
        ) from None
    if rate <= 0:
        raise ValueError(f"{READ_RATE_ENV} must be positive")
    return rate


def default_read_threads() -> int:
    """``SGLANG_CKPT_READ_THREADS`` if set, else up to 32, sharing this process's cores with the other loader ranks
    of the node (torchrun's LOCAL_WORLD_SIZE)."""
    if os.environ.get(READ_THREADS_ENV):
        return max(1, int(os.environ[READ_THREADS_ENV]))
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(32, len(os.sched_getaffinity(0)) // ranks_here))


class CheckpointReader:
    """Keeps one open descriptor per file; counts the bytes it reads. ``threads``: how many read at once."""

    def __init__(self, threads: int | None = None) -> None:
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self.bytes_read = 0
        self.direct_bytes = 0  # of bytes_read: read with O_DIRECT, past the page cache
        self._warned_unpinnable = False
        self.threads = threads or default_read_threads()
        self._pool: ThreadPoolExecutor | None = None
        self.rate = read_rate_limit()
        self._rate_start: float | None = None

    def fd(self, path: str) -> int:
        """The reader's descriptor of ``path`` (opened once, closed by ``close``). No kernel read-ahead on it: a rank
        reads its own tensors, which lie between other ranks' tensors, and read-ahead past a tensor's end reads
        bytes another node reads (on a disk read at 16 MiB/s it read 35% more than asked and took 30% longer); every
        read here is large and says exactly what it needs."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def direct_fd(self, path: str) -> int | None:
        """``path`` opened with O_DIRECT (once); None where the filesystem refuses it (tmpfs, some FUSE)."""
        if path not in self._direct_fds:
            try:
                self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self._direct_fds[path] = None
        return self._direct_fds[path]

    def read_range(self, path: str, offset: int, dest: memoryview) -> None:
        self.read_ranges([(path, offset, dest)])

    def read_direct(self, path: str, offset: int, dest: memoryview) -> int:
        """Read up to ``len(dest)`` bytes at ``offset`` past the page cache (O_DIRECT; an ordinary read where the
        filesystem refuses it): a cold file costs one copy, storage -> ``dest``, instead of two. ``offset``,
        ``len(dest)`` and ``dest``'s address are multiples of DIRECT_ALIGN. Returns the bytes read: fewer only at
        the end of the file."""
        fd = self.direct_fd(path)
        direct = fd is not None
        fd = fd if direct else self.fd(path)
        piece = self.piece_bytes(len(dest)) // DIRECT_ALIGN * DIRECT_ALIGN
        pieces = [(fd, path, offset + at, dest[at : at + piece]) for at in range(0, len(dest), piece)]
        try:
            got = sum(self._in_threads(_pread_upto, pieces))
        except OSError as exc:
            if not direct or exc.errno not in (errno.EINVAL, errno.EFAULT):
                raise
            if exc.errno == errno.EINVAL:  # a block size above DIRECT_ALIGN: read this file as usual from now on
                os.close(self._direct_fds.pop(path))
                self._direct_fds[path] = None
                return self.read_direct(path, offset, dest)
            # EFAULT: memory the kernel cannot pin for O_DIRECT (some carve-outs): this window as usual
            if not self._warned_unpinnable:
                logger.warning(
                    "O_DIRECT cannot read into this memory (%s); such windows go through the page cache", exc
                )
                self._warned_unpinnable = True
            direct = False
            got = sum(self._in_threads(_pread_upto, [(self.fd(path), *rest) for _, *rest in pieces]))
        self.bytes_read += got
        self.direct_bytes += got if direct else 0
        if self.rate:
            self._throttle()
        return got

    def _in_threads(self, read, pieces: list[tuple]) -> list:
        """``read(*piece)`` for every piece, over the reading threads when there is more than one piece."""
        if self.rate and self._rate_start is None:
            self._rate_start = time.monotonic()
        if self.threads > 1 and len(pieces) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-read")
            return [future.result() for future in [self._pool.submit(read, *piece) for piece in pieces]]
        return [read(*piece) for piece in pieces]

    def read_ranges(self, ranges: list[tuple[str, int, memoryview]]) -> None:
        """Read each ``(path, offset, dest)``; returns once all are read. Split over the reading threads when
        there is enough to share."""
        piece = self.piece_bytes(sum(len(dest) for _, _, dest in ranges))
        pieces = [
            (self.fd(path), path, offset + at, dest[at : at + piece])
            for path, offset, dest in ranges
            for at in range(0, len(dest), piece)
        ]
        self._in_threads(_pread_exactly, pieces)
        self.bytes_read += sum(len(dest) for _, _, dest in ranges)
        if self.rate:
            self._throttle()

    def piece_bytes(self, total: int) -> int:
        return max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, total // (2 * self.threads)))

    def _throttle(self) -> None:
        """Sleep until this reader's average rate since its first read began is within the limit."""
        ahead = self.bytes_read / self.rate - (time.monotonic() - self._rate_start)
        if ahead > 0:
            time.sleep(ahead)

    def fill(self, bucket: Bucket, host) -> None:
        """Read every tensor of ``bucket`` into ``host`` (a memoryview or a CPU uint8 tensor) at its slot offset."""
        view = host_view(host)
        self.read_ranges(
            [(s.tensor.file, s.tensor.file_offset, view[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()


def host_view(host) -> memoryview:
    """The bytes of a CPU buffer: a memoryview as it is, a CPU uint8 tensor through numpy (zero-copy)."""
    return host if isinstance(host, memoryview) else memoryview(host.numpy())


def _pread_upto(fd: int, path: str, offset: int, dest: memoryview) -> int:
    """Read into ``dest`` until it is full or the file ends; the bytes read."""
    done = 0
    while done < len(dest):
        try:
            n = os.preadv(fd, [dest[done:]], offset + done)
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: reading {len(dest)} bytes at {offset + done}: {exc.strerror}") from None
        if n <= 0:
            break
        done += n
    return done


def _pread_exactly(fd: int, path: str, offset: int, dest: memoryview) -> None:
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (file changed while reading?)")
        done += n
