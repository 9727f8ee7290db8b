"""Read the checkpoint while the server starts: the loader brings its share of the files into the page cache
before the server answers, so that a cold checkpoint costs max(server start, read) + the hand-over instead of
their sum. The push then reads (or the server maps) warm pages at memory speed.

The page cache is the staging memory here, on CPU and GPU nodes alike: it is the memory the push reads from
anyway, it needs no placement (which the server tells only once it is up), and pages already cached are skipped
(``mincore``), so a checkpoint a trainer has just written costs nothing. At most half of the node's available
memory is read ahead; the rest is read as the push goes. Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from .checkpoint import TensorInfo, read_update
from .options import LoaderOptions
from .plan import shard_by_bytes
from .rank_setup import host_available_memory
from .reader import PAGE, CheckpointReader, cached_bytes
from .route import Servers, decide_route
from .world import LoaderWorld

WINDOW_BYTES = 64 << 20  # read (and checked against the cache) in windows of this size
STOP_WITHIN_S = 0.1  # under SGLANG_CKPT_READ_RATE, windows small enough that a stop waits about this long
MEMORY_SHARE = 0.5  # of MemAvailable at most is read ahead
PR_SET_PDEATHSIG = 1  # prctl: the signal a process gets when its parent ends


def drop_cached(path: str) -> int:
    """Write ``path``'s dirty pages and drop the file from the page cache (a cold start for benches and tests);
    returns the bytes still cached (a filesystem such as tmpfs keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return cached_bytes(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def file_spans(tensors: list[TensorInfo]) -> list[tuple[str, int, int]]:
    """(file, offset, length) covering the tensors, adjacent ones merged, in file order."""
    spans: list[list] = []
    for t in sorted(tensors, key=lambda t: (t.file, t.file_offset)):
        if spans and spans[-1][0] == t.file and spans[-1][1] + spans[-1][2] == t.file_offset:
            spans[-1][2] += t.nbytes
        else:
            spans.append([t.file, t.file_offset, t.nbytes])
    return [tuple(s) for s in spans]


def likely_share(args: LoaderOptions, world: LoaderWorld, tensors: list[TensorInfo]) -> list[TensorInfo]:
    """The tensors this loader rank will read, as far as it can tell before the server says where it runs: the route
    for the servers' guessed device (a wrong guess only reads other bytes ahead; the push reads what it needs)."""
    servers = Servers.guessed(args)
    route = decide_route(args, world, servers)
    if not route.feeding.fed[world.rank]:
        return []
    if servers.on_cpu and route.transfer("cpu", mappable=True) == "map":  # the feeder maps every file
        return tensors
    feeders = route.feeding.feeders
    return shard_by_bytes(tensors, len(feeders))[feeders.index(world.rank)]


@dataclass
class EarlyReadResult:
    read_bytes: int = 0  # read from storage into the page cache
    cached_bytes: int = 0  # were cached already (skipped)
    share_bytes: int = 0  # this rank's share of the checkpoint
    seconds: float = 0.0
    error: str = ""

    def line(self, tag: str) -> str:
        if self.error:
            return f"{tag} reading ahead stopped: {self.error} (the push reads the files itself)"
        return (
            f"{tag} while waiting for the server: read {self.read_bytes / 1e9:.3f} GB of its "
            f"{self.share_bytes / 1e9:.3f} GB share into the page cache in {self.seconds:.3f} s "
            f"({self.cached_bytes / 1e9:.3f} GB were cached already)"
        )


def window_bytes(rate: float | None) -> int:
    """WINDOW_BYTES, or under a read-rate limit what that rate reads in STOP_WITHIN_S (whole pages): the reader
    sleeps after each window to keep to the rate, and a stop waits for the window in progress."""
    if rate is None:
        return WINDOW_BYTES
    return max(PAGE, min(WINDOW_BYTES, int(rate * STOP_WITHIN_S)) // PAGE * PAGE)


class EarlyRead:
    """A thread that reads this rank's share into the page cache until ``stop()`` (the server has answered)."""

    def __init__(self, spans: list[tuple[str, int, int]], budget_bytes: int | None = None):
        self.spans = spans
        self.budget = budget_bytes if budget_bytes is not None else int(host_available_memory() * MEMORY_SHARE)
        self.result = EarlyReadResult(share_bytes=sum(n for _, _, n in spans))
        self._stop = threading.Event()
        self._t0: float | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-early-read", daemon=True)

    @classmethod
    def for_rank(cls, args: LoaderOptions, world: LoaderWorld) -> EarlyRead | None:
        """None where there is nothing to read ahead (a saved plan, a watched directory, reading ahead is off)."""
        return cls._of(args, [world])

    @classmethod
    def for_node(cls, args: LoaderOptions) -> EarlyRead | None:
        """Before torchrun starts this node's loader ranks (``--nnodes`` / ``--node-rank``): what they will read."""
        return cls._of(
            args, LoaderWorld.of_node(args.inference_parallel_size, args.nnodes, args.node_rank).node_ranks()
        )

    @classmethod
    def _of(cls, args: LoaderOptions, worlds: list[LoaderWorld]) -> EarlyRead | None:
        if not args.checkpoint_path or args.load_metas_file or args.no_read_ahead:
            return None
        try:
            tensors = read_update(args.checkpoint_path, args.draft_checkpoint_path)
        except (OSError, ValueError):  # the update's own plan reports a bad checkpoint
            return None
        share = [t for world in worlds for t in likely_share(args, world, tensors)]
        return cls(file_spans(share)) if share else None

    def start(self) -> EarlyRead:
        """Start reading (once; a second call does nothing)."""
        if not self._thread.is_alive() and not self._stop.is_set() and self._t0 is None:
            self._t0 = time.perf_counter()
            self._thread.start()
        return self

    def stop(self) -> EarlyReadResult:
        """Stop after the window being read; what was read stays cached."""
        self._stop.set()
        if self._t0 is not None:
            self._thread.join()
        return self.result

    def read_on_in_child(self) -> int | None:
        """After ``stop()``, with no other thread of this process running: a child process reads the rest of the share
        (what is cached is skipped) and exits. It outlives this process's exec (torchrun starting in its place, so the
        disk keeps reading while torchrun and its ranks start) and is killed when that process ends. Its pid (None:
        no process could be made; the ranks read ahead themselves)."""
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            return None
        if pid:
            return pid
        try:  # the child: nothing of the parent's but this thread; it leaves by os._exit only
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == parent:
                EarlyRead(self.spans, self.budget).start().join()
        finally:
            os._exit(0)

    def join(self) -> EarlyReadResult:
        """Wait until the whole share (or the budget) is read."""
        self._thread.join()
        return self.result

    def report(self, world: LoaderWorld) -> None:
        """Stop, and say what was read ahead."""
        tag = f"[sglang-ckpt rank {world.rank}]" if world.distributed else "[sglang-ckpt]"
        print(self.stop().line(tag), file=sys.stderr)

    def _run(self) -> None:
        reader = CheckpointReader()
        size = window_bytes(reader.rate)
        scratch = memoryview(bytearray(size))
        result, left = self.result, self.budget
        try:
            for path, offset, length in self.spans:
                fd = reader.fd(path)
                for at in range(offset, offset + length, size):
                    n = min(size, offset + length - at)
                    if self._stop.is_set() or left < n:
                        return
                    cached = cached_bytes(fd, at, n)
                    if cached >= n:
                        result.cached_bytes += n
                        continue
                    reader.read_range(path, at, scratch[:n])
                    result.read_bytes += n - cached
                    result.cached_bytes += cached
                    left -= n
        except OSError as exc:
            result.error = str(exc)
        finally:
            result.seconds = time.perf_counter() - self._t0
            reader.close()
