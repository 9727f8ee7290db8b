"""The inference-rank side of one update: map the loader's buffers, load each bucket, acknowledge it.

Runs inside SGLang's scheduler/TP-worker process (called from the model runner's weight updater, see
sglang_compat.py). Model-agnostic: it is given ``load_weights`` (the model's own) and ``post_process``.
Tensors handed to ``load_weights`` are views into the loader's buffer: nothing is copied on the way in.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..transport.channel import Channel, PeerGone, check_endpoint
from ..transport.fdpass import KEPT_SUFFIX, fd_socket_path, receive_fds, send_fds_to
from ..transport.handles import MappedBuffer, open_buffer, open_file_range
from ..transport.integrity import Fingerprint, tensor_digest
from ..transport.messages import (
    Abort,
    BucketReady,
    BuffersGranted,
    BuffersWanted,
    CudaIpcHandle,
    FileHandle,
    Finish,
    Hello,
    ProtocolError,
    Reply,
    ShmFdHandle,
)
from ..transport.word_sums import device_digest
from .coverage import written_bytes
from .kept_buffers import BuffersBusy, KeptBuffers
from .together import GroupsTogether
from .validate import CheckedUpdate

logger = logging.getLogger(__name__)

LoadFn = Callable[[Iterable[tuple[str, torch.Tensor]]], object]
_KEPT_ALIVE: list = []  # mappings a model kept views into (see _unmap)
HELLO_TIMEOUT_ENV = "SGLANG_CKPT_HELLO_TIMEOUT"
DEFAULT_HELLO_TIMEOUT_S = 15.0  # a loader that bound its socket says hello at once; not the long idle timeout


STAGED_CUDA_IPC_REFUSAL = (
    "a staged update must be held in host shared memory (run the loader with --device cpu, or stream it with "
    "--two-phase off): CUDA IPC buffers live only as long as the loader process"
)


class UpdateFailed(RuntimeError):
    pass


class UpdateRefused(UpdateFailed):
    """The update was refused before the session wrote anything (it does not fit the model)."""


@dataclass
class ReceiveStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    load_s: float = 0.0
    post_s: float = 0.0
    fingerprint: str | None = None  # set when the loader asked for verification


def _nbytes(dtype: str, shape) -> int:
    return getattr(torch, dtype).itemsize * math.prod(shape)


def bucket_views(msg: BucketReady, buffers: list[MappedBuffer | None]) -> list[tuple[str, torch.Tensor]]:
    """Typed views into the mapped buffer for every tensor of a bucket, after bounds checks."""
    if msg.buffer >= len(buffers):
        raise ProtocolError(f"bucket {msg.seq} names buffer {msg.buffer}, only {len(buffers)} mapped")
    if not msg.tensors:
        return []
    if buffers[msg.buffer] is None:
        raise ProtocolError(f"bucket {msg.seq}: buffer {msg.buffer} is not mapped")
    flat, base = buffers[msg.buffer].tensor, buffers[msg.buffer].base
    views = []
    for slot in msg.tensors:
        dtype = getattr(torch, slot.dtype)
        nbytes = _nbytes(slot.dtype, slot.shape)
        start = slot.offset - base
        if start < 0 or start + nbytes > flat.numel():
            raise ProtocolError(f"tensor {slot.name!r} ({nbytes} bytes at {slot.offset}) lies outside its buffer")
        if slot.offset % dtype.itemsize:
            raise ProtocolError(f"tensor {slot.name!r}: offset {slot.offset} not aligned for {slot.dtype}")
        views.append((slot.name, flat[start : start + nbytes].view(dtype).view(slot.shape)))
    return views


class Manifest:
    """The update's contract: every bucket must hold tensors it lists, as listed, each exactly once."""

    def __init__(self, hello: Hello):
        self.expected = {m.name: (m.dtype, list(m.shape)) for m in hello.manifest}
        if len(self.expected) != len(hello.manifest):
            raise ProtocolError("the manifest names a tensor twice")
        self.delivered: set[str] = set()

    def check_bucket(self, msg: BucketReady) -> None:
        """Raise ProtocolError (before anything of the bucket is loaded) for a tensor outside the manifest."""
        seen = set()
        for slot in msg.tensors:
            want = self.expected.get(slot.name)
            if want is None:
                raise ProtocolError(f"bucket {msg.seq}: tensor {slot.name!r} is not in the update's manifest")
            if (slot.dtype, list(slot.shape)) != want:
                raise ProtocolError(
                    f"bucket {msg.seq}: tensor {slot.name!r} is {slot.dtype} {list(slot.shape)}, "
                    f"the manifest says {want[0]} {want[1]}"
                )
            if slot.name in self.delivered or slot.name in seen:
                raise ProtocolError(f"bucket {msg.seq}: tensor {slot.name!r} was already sent in this update")
            seen.add(slot.name)
        self.delivered |= seen

    def check_finished(self) -> None:
        if len(self.delivered) != len(self.expected):
            missing = sorted(set(self.expected) - self.delivered)
            raise ProtocolError(
                f"the loader finished after {len(self.delivered)} of the manifest's {len(self.expected)} "
                f"tensors (missing {missing[:3]}...)"
            )


def _send_error(channel: Channel, seq: int, error: str, opened: list[int] | None = None) -> None:
    """Tell the loader why, if it is still there; never wait long for a loader that is gone. ``opened``: the answer
    to a hello says which CUDA IPC handles this rank opened (the loader gives back the others)."""
    try:
        channel.send(Reply(seq=seq, ok=False, error=error[:4000], opened=opened or []), timeout_s=1.0)
    except TimeoutError:
        pass


def _send_ok(channel: Channel, reply: Reply) -> None:
    """A live loader takes a reply at once (the socket queues it); only a vanished one makes this wait."""
    try:
        channel.send(reply, timeout_s=5.0)
    except TimeoutError:
        raise UpdateFailed("the loader stopped taking replies (its process ended?)") from None


def _without_frames(exc: BaseException) -> str:
    """What went wrong, as text, with the traceback logged. Re-raising ``exc`` (or chaining to it) would keep the
    frames of the model's ``load_weights`` and with them the bucket's views: the loader's buffer could then never
    be unmapped (on a GPU: an IPC mapping never closed). The caller raises after its ``except`` block."""
    logger.debug("a bucket failed to load:\n%s", "".join(traceback.format_exception(exc)))
    return f"{type(exc).__name__}: {exc}"


def default_hello_timeout_s() -> float:
    return float(os.environ.get(HELLO_TIMEOUT_ENV, DEFAULT_HELLO_TIMEOUT_S))


class ReceiveSession:
    """One update on one rank. ``run()`` returns stats or raises UpdateFailed (UpdateRefused when nothing was
    written); it never leaves buffers mapped or descriptors open. ``coverage``: what the update writes, from
    ``validate`` (manifest, partial, allow_unused) -> CheckedUpdate, which raises ValueError to refuse it; the
    groups it names reach ``load_weights`` together (together.py)."""

    def __init__(
        self,
        endpoint: str,
        device: torch.device,
        load_weights: LoadFn,
        post_process: Callable[[], None],
        idle_timeout_s: float,
        validate: Callable[[list, bool, bool], CheckedUpdate],
        prepare: Callable[[], None] = lambda: None,
        hello_timeout_s: float | None = None,
        staging: bool = False,
        abandon: Callable[[], None] = lambda: None,
        kept: KeptBuffers | None = None,
    ):
        self.endpoint = check_endpoint(endpoint)
        self.device = device
        self.load_weights = load_weights
        self.post_process = post_process
        self.prepare = prepare  # runs once, just before the first write to the model
        self.abandon = abandon  # runs when a load that began fails (post-processed modules go back as served)
        self.validate = validate
        self.idle_timeout_s = idle_timeout_s
        self.hello_timeout_s = default_hello_timeout_s() if hello_timeout_s is None else hello_timeout_s
        self.buffers: list[MappedBuffer | None] = []
        self.handles: list = []
        self.fds: list[int] = []
        self.opened_ipc: list[int] = []  # hello's buffers whose CUDA IPC handle this rank opened
        self.stats = ReceiveStats()
        self.touched_weights = False  # after a failure: were the served weights already changed?
        self.coverage: dict | None = None  # what this update writes (set once the manifest was validated)
        self.writes: dict[str, frozenset[str]] = {}  # update tensor -> the parameters it writes (same time)
        self.together = GroupsTogether(())  # tensors the model loads only in one call (from the check)
        self.manifest: Manifest | None = None
        self.verify = False
        self.digests = Fingerprint()
        # Stage mode: every bucket is checked (manifest, bounds, digests) and kept mapped, nothing is loaded;
        # commit() loads them later. Streaming mode loads each bucket as it arrives.
        self.staging = staging
        self.staged_at: float | None = None  # staging: when every bucket had been checked (wall clock)
        self.staged: list[BucketReady] = []
        self.update_id: str | None = None  # from the hello
        self.kept = kept  # buffers this rank keeps between updates and lends to a loader that asks
        self.borrowed = False  # this update holds them

    def run(self) -> ReceiveStats:
        """Streaming: the whole update. Stage mode: receive and check every bucket; on success the buffers stay
        mapped for commit() (release() frees them); on failure nothing is kept."""
        keep = False
        try:
            with Channel(self.endpoint, bind=False) as channel:
                try:
                    self._abandoning(self._serve, channel)
                    keep = self.staging
                finally:
                    if not keep:
                        self._release()
        finally:
            # A loader killed with SIGKILL cannot remove its socket files; they live in our private directory.
            paths = (
                self.endpoint.removeprefix("ipc://"),
                *(fd_socket_path(self.endpoint, s) for s in (".fds", KEPT_SUFFIX)),
            )
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return self.stats

    def _abandoning(self, step, *args):
        try:
            return step(*args)
        except BaseException:
            if self.touched_weights:
                self.abandon()
            raise

    def _recv(self, channel: Channel, what: str, timeout_s: float):
        try:
            return channel.recv(timeout_s)
        except TimeoutError:
            raise UpdateFailed(f"loader went quiet: no {what} within {timeout_s:g} s") from None
        except PeerGone as exc:
            raise UpdateFailed(f"loader disconnected while the server waited for a {what}: {exc}") from None
        except ProtocolError as exc:
            _send_error(channel, -1, str(exc))
            raise UpdateFailed(f"bad message from the loader: {exc}") from None

    def _serve(self, channel: Channel) -> None:
        hello = self._recv(channel, "hello", self.hello_timeout_s)
        if isinstance(hello, BuffersWanted):
            self._lend(channel, hello)
            hello = self._recv(channel, "hello", self.hello_timeout_s)
        if isinstance(hello, Abort):
            raise UpdateFailed(f"loader aborted the update before it started: {hello.reason}")
        if not isinstance(hello, Hello):
            raise UpdateFailed(f"expected hello, got {type(hello).__name__}")
        self.update_id = hello.update_id
        if self.staging and any(isinstance(h, CudaIpcHandle) for h in hello.buffers):
            # a loader that exits before the commit would leave staged views into freed device memory
            _send_error(channel, -1, STAGED_CUDA_IPC_REFUSAL)  # none opened: the loader gives every one back
            raise UpdateRefused(STAGED_CUDA_IPC_REFUSAL)
        try:
            self._map(hello)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a CUDA IPC handle that will not open
            _send_error(channel, -1, str(exc), self.opened_ipc)
            raise UpdateFailed(f"cannot map the loader's buffers: {exc}") from None
        self.checksum = hello.checksum
        self.verify = hello.checksum != "none"
        try:
            checked = self.validate(
                [(m.name, m.dtype, m.shape) for m in hello.manifest], hello.partial, hello.allow_unused
            )
            self.coverage, self.together = checked.coverage, GroupsTogether(checked.together)
            self.writes = checked.writes
            self.manifest = Manifest(hello)
        except ValueError as exc:
            _send_error(channel, -1, f"update rejected: {exc}", self.opened_ipc)
            raise UpdateRefused(f"update rejected: {exc}") from exc
        _send_ok(channel, Reply(seq=-1, ok=True, written_bytes=written_bytes(self.coverage), opened=self.opened_ipc))

        while True:
            msg = self._recv(channel, "bucket", self.idle_timeout_s)
            if isinstance(msg, Abort):
                raise UpdateFailed(f"loader aborted the update: {msg.reason}")
            if isinstance(msg, Finish):
                self._finish(channel, msg)
                return
            if not isinstance(msg, BucketReady):
                raise UpdateFailed(f"unexpected {type(msg).__name__} during an update")
            self._load_bucket(channel, msg)

    def _lend(self, channel: Channel, wanted: BuffersWanted) -> None:
        """Lend this rank's kept buffers to the loader (its descriptor over ``<endpoint>.kept``), or say why not:
        the loader then allocates its own, and the update goes on either way."""
        if self.kept is None:
            _send_error(channel, -2, "this server keeps no update buffers (start it with --keep-update-buffers)")
            return
        try:
            fd, offsets = self.kept.lend(wanted.sizes, self)
        except (BuffersBusy, OSError) as exc:
            _send_error(channel, -2, str(exc))
            return
        self.borrowed = True
        try:
            send_fds_to(fd_socket_path(self.endpoint, KEPT_SUFFIX), [fd], self.hello_timeout_s)
        except (OSError, ValueError) as exc:
            raise UpdateFailed(f"could not hand the kept update buffers to the loader: {exc}") from None
        _send_ok(channel, BuffersGranted(offsets=offsets, nbytes=self.kept.nbytes))

    def _map(self, hello: Hello) -> None:
        """Receive the descriptors (SCM_RIGHTS) for fd-backed buffers, map the rest. Checkpoint files
        (page-cache mode) are mapped per bucket, one byte range at a time."""
        self.handles = list(hello.buffers)
        self.buffers = [None] * len(self.handles)
        slots = {h.slot for h in self.handles if isinstance(h, (ShmFdHandle, FileHandle))}  # 0..n-1 (messages.py)
        if slots:
            self.fds = receive_fds(fd_socket_path(self.endpoint), len(slots), self.hello_timeout_s)
        for i, h in enumerate(self.handles):
            if isinstance(h, FileHandle):
                open_file_range(self.fds[h.slot], h, 0, 0).close()  # checks the file now
            elif isinstance(h, ShmFdHandle) and self.borrowed and self.kept.is_this_file(self.fds[h.slot]):
                self.buffers[i] = self.kept.view(h.offset, h.nbytes)  # mapped since the rank allocated it
            elif isinstance(h, ShmFdHandle):
                self.buffers[i] = open_buffer(h, self.device, self.fds[h.slot])
            else:
                self.buffers[i] = open_buffer(h, self.device)
                if isinstance(h, CudaIpcHandle):
                    self.opened_ipc.append(i)  # its reference is given back when this rank closes it

    def _load_bucket(self, channel: Channel, msg: BucketReady) -> None:
        t0 = time.perf_counter()
        views, error = [], None
        try:
            self.manifest.check_bucket(msg)
            self._map_for(msg)
            views = bucket_views(msg, self.buffers)
            if self.verify:
                self._verify(msg, views)
            if self.staging:  # checked and kept; loaded by commit()
                self.staged.append(msg)
                del views
                _send_ok(channel, Reply(seq=msg.seq, ok=True, elapsed_s=time.perf_counter() - t0))
                return
            self._write(views)
        except Exception as exc:
            error = _without_frames(exc)
        if error is not None:
            del views
            _send_error(channel, msg.seq, error)
            raise UpdateFailed(f"loading bucket {msg.seq} failed: {error}")
        elapsed = self._count(views, t0)
        del views
        if self.buffers[msg.buffer] is not None and self.buffers[msg.buffer].views_alive():
            # the loader refills (or unmaps) this memory next: a kept view would change under the model
            _send_error(channel, msg.seq, "the model kept a tensor it was given")
            raise UpdateFailed(
                f"bucket {msg.seq}: the model kept a reference to a tensor it was given instead of "
                "copying it; refusing to let the loader reuse that memory"
            )
        _send_ok(channel, Reply(seq=msg.seq, ok=True, elapsed_s=elapsed))

    def _write(self, views: list[tuple[str, torch.Tensor]]) -> None:
        """Hand one bucket to the model's own load_weights (the model prepared before its first write). On CUDA the
        copies are finished on return: the loader may refill (streaming) or release (commit) the buffer next.
        Members of a group the model loads together wait (copied) for the rest of their group."""
        views = self.together.arrange(views)
        if not views:
            return
        if not self.touched_weights:
            self.touched_weights = True
            self.prepare()
        self.load_weights(views)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _count(self, views: list[tuple[str, torch.Tensor]], t0: float) -> float:
        elapsed = time.perf_counter() - t0
        self.stats.buckets += 1
        self.stats.tensors += len(views)
        self.stats.bytes += sum(v.nbytes for _, v in views)
        self.stats.load_s += elapsed
        return elapsed

    def _verify(self, msg: BucketReady, views: list[tuple[str, torch.Tensor]]) -> None:
        """Check every tensor's bytes against the loader's digest before anything is written."""
        if msg.digests is None:
            raise ProtocolError(f"bucket {msg.seq} carries no digests although the loader asked for verification")
        for (name, view), slot, expected in zip(views, msg.tensors, msg.digests):
            flat = view.reshape(-1).view(torch.uint8)
            digest = device_digest(flat) if self.checksum == "wordsum" else tensor_digest(flat.cpu())
            if digest != expected:
                raise ProtocolError(
                    f"checksum mismatch on tensor {name!r} in bucket {msg.seq}: the bytes changed "
                    "between the loader and the server (memory corruption or a concurrent writer)"
                )
            self.digests.add(name, slot.dtype, slot.shape, digest)

    def _finish(self, channel: Channel, msg: Finish) -> None:
        try:
            self.manifest.check_finished()
            self.together.check_finished()
            if self.staging:
                self._drop_file_ranges()
                self.staged_at = time.time()  # before the reply: the loader may commit any instance once it has it
                _send_ok(channel, Reply(seq=msg.seq, ok=True))
                return
            self._unmap()  # release the loader's memory before post-processing (peak memory)
        except (ProtocolError, UpdateFailed) as exc:
            _send_error(channel, msg.seq, str(exc))
            raise UpdateFailed(str(exc)) from exc
        try:
            self._post_process()
        except UpdateFailed as exc:
            _send_error(channel, msg.seq, str(exc))
            raise
        _send_ok(channel, Reply(seq=msg.seq, ok=True, elapsed_s=self.stats.post_s))

    def _post_process(self) -> None:
        t0 = time.perf_counter()
        self.touched_weights = True
        try:
            self.post_process()
        except Exception as exc:
            raise UpdateFailed(f"post-load processing failed: {type(exc).__name__}: {exc}") from exc
        self.stats.post_s = time.perf_counter() - t0
        if self.verify:
            self.stats.fingerprint = self.digests.hexdigest()

    def commit(self) -> ReceiveStats:
        """Stage mode, after run() succeeded: load every staged bucket, then post-process. The staged bytes stay
        mapped (a failed commit can be retried from them) until release(). Raises UpdateFailed."""
        return self._abandoning(self._commit)

    def _commit(self) -> ReceiveStats:
        self.touched_weights = False  # a retried commit prepares the model again
        self.stats = ReceiveStats(fingerprint=None)
        self.together.clear()  # a retried commit starts its groups afresh
        for msg in self.staged:
            t0 = time.perf_counter()
            views, error = [], None
            try:
                self._map_for(msg)
                views = bucket_views(msg, self.buffers)
                self._write(views)
            except Exception as exc:
                error = _without_frames(exc)
            if error is not None:
                del views
                raise UpdateFailed(f"loading staged bucket {msg.seq} failed: {error}")
            self._count(views, t0)
            del views
        self._drop_file_ranges()
        if any(b is not None and b.views_alive() for b in self.buffers):
            raise UpdateFailed("the model kept a reference to a tensor it was given instead of copying it")
        self._post_process()
        return self.stats

    def staged_bytes(self) -> int:
        return sum(_nbytes(t.dtype, t.shape) for msg in self.staged for t in msg.tensors)

    def release(self) -> None:
        """Unmap and close everything a staged update holds (idempotent)."""
        self._release()

    def _map_for(self, msg: BucketReady) -> None:
        """Page-cache mode: map just this bucket's byte range of its file, dropping the previous range, so the
        rank's memory grows by about one bucket whatever the checkpoint size."""
        index = msg.buffer
        if not 0 <= index < len(self.handles) or not isinstance(self.handles[index], FileHandle):
            return
        self._drop_file_ranges()
        if msg.tensors:
            start = min(s.offset for s in msg.tensors)
            end = max(s.offset + _nbytes(s.dtype, s.shape) for s in msg.tensors)
            handle = self.handles[index]
            self.buffers[index] = open_file_range(self.fds[handle.slot], handle, start, end)

    def _drop_file_ranges(self) -> None:
        for i, b in enumerate(self.buffers):
            if b is not None and isinstance(self.handles[i], FileHandle):
                self.buffers[i] = None
                b.close()

    def _unmap(self) -> None:
        """Unmap every buffer. A view still referenced somewhere (a model that kept a tensor it was given)
        would alias the loader's memory: that fails the update."""
        kept = 0
        for b in self.buffers:
            if b is None:
                continue
            try:
                b.close()
            except BufferError:
                kept += 1
                _KEPT_ALIVE.append(b)  # never unmapped under a live view: it lives as long as this process
        self.buffers = []
        if kept and self.borrowed:  # the next update must not write under that view: the file is not lent again
            self.kept.retire()
        if kept:
            raise UpdateFailed(
                f"{kept} loader buffer(s) could not be unmapped: the model kept a reference to a tensor "
                "it was given instead of copying it"
            )

    def _release(self) -> None:
        try:
            self._unmap()
        except UpdateFailed as exc:
            logger.error("%s", exc)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            if self.borrowed:
                self.kept.give_back(self)
                self.borrowed = False
