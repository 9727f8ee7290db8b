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
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..transport.channel import Channel, PeerGone, check_endpoint
from ..transport.handles import MappedBuffer, open_buffer, open_file_range
from ..transport.messages import FileHandle
from ..transport.integrity import Fingerprint, tensor_digest
from ..transport.messages import Abort, BucketReady, Finish, Hello, ProtocolError, Reply

logger = logging.getLogger(__name__)

LoadFn = Callable[[Iterable[tuple[str, torch.Tensor]]], object]


class UpdateFailed(RuntimeError):
    pass


@dataclass
class ReceiveStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    load_s: float = 0.0
    post_s: float = 0.0
    fingerprint: str | None = None  # set when the loader asked for verification


def bucket_views(msg: BucketReady, buffers: list[MappedBuffer]) -> list[tuple[str, torch.Tensor]]:
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
        nbytes = dtype.itemsize
        for d in slot.shape:
            nbytes *= d
        start = slot.offset - base
        if start < 0 or start + nbytes > flat.numel():
            raise ProtocolError(f"tensor {slot.name!r} ({nbytes} bytes at {slot.offset}) lies outside its buffer")
        if slot.offset % dtype.itemsize:
            raise ProtocolError(f"tensor {slot.name!r}: offset {slot.offset} not aligned for {slot.dtype}")
        views.append((slot.name, flat[start : start + nbytes].view(dtype).view(slot.shape)))
    return views


def _send_error(channel: Channel, seq: int, error: str) -> None:
    """Tell the loader why, if it is still there; never wait long for a loader that is gone."""
    try:
        channel.send(Reply(seq=seq, ok=False, error=error[:4000]), timeout_s=1.0)
    except TimeoutError:
        pass


def _send_ok(channel: Channel, reply: Reply) -> None:
    """A live loader takes a reply at once (the socket queues it); only a vanished one makes this wait."""
    try:
        channel.send(reply, timeout_s=5.0)
    except TimeoutError:
        raise UpdateFailed("the loader stopped taking replies (its process ended?)") from None


class ReceiveSession:
    """One update on one rank. ``run()`` returns stats or raises UpdateFailed; it never leaves buffers mapped."""

    def __init__(
        self,
        endpoint: str,
        device: torch.device,
        load_weights: LoadFn,
        post_process: Callable[[], None],
        idle_timeout_s: float,
        prepare: Callable[[], None] = lambda: None,
        validate: Callable[[list, bool, bool], None] | None = None,
    ):
        self.endpoint = check_endpoint(endpoint)
        self.device = device
        self.load_weights = load_weights
        self.post_process = post_process
        self.prepare = prepare  # runs once, just before the first write to the model
        self.validate = validate  # (manifest, partial, allow_unused) -> None or raises ValueError
        self.idle_timeout_s = idle_timeout_s
        self.buffers: list[MappedBuffer | None] = []
        self.handles: list = []
        self.stats = ReceiveStats()
        self.touched_weights = False  # after a failure: were the served weights already changed?
        self.verify = False
        self.digests = Fingerprint()

    def run(self) -> ReceiveStats:
        try:
            with Channel(self.endpoint, bind=False) as channel:
                try:
                    self._serve(channel)
                finally:
                    self._unmap()
        finally:
            # A loader killed with SIGKILL cannot remove its socket file; it lives in our private directory.
            try:
                os.unlink(self.endpoint.removeprefix("ipc://"))
            except FileNotFoundError:
                pass
        return self.stats

    def _recv(self, channel: Channel, what: str):
        try:
            return channel.recv(self.idle_timeout_s)
        except TimeoutError:
            raise UpdateFailed(f"loader went quiet: no {what} within {self.idle_timeout_s:g} s") from None
        except PeerGone as exc:
            raise UpdateFailed(f"loader disconnected while the server waited for a {what}: {exc}") from None

    def _serve(self, channel: Channel) -> None:
        hello = self._recv(channel, "hello")
        if isinstance(hello, Abort):
            raise UpdateFailed(f"loader aborted the update before it started: {hello.reason}")
        if not isinstance(hello, Hello):
            raise UpdateFailed(f"expected hello, got {type(hello).__name__}")
        try:
            self.handles = list(hello.buffers)
            # Checkpoint files (page-cache mode) are mapped when first used, one at a time; the first one now,
            # so a handle we cannot open fails the update before anything is written.
            self.buffers = [None] * len(self.handles)
            for i, h in enumerate(self.handles):
                if isinstance(h, FileHandle):
                    open_file_range(h, 0, 0).close()  # checks access now; ranges are mapped per bucket
                else:
                    self.buffers[i] = open_buffer(h, self.device)
        except (OSError, ValueError) as exc:
            _send_error(channel, -1, str(exc))
            raise UpdateFailed(f"cannot map the loader's buffers: {exc}") from exc
        self.verify = hello.checksum == "xxh3"
        if self.validate is not None and hello.manifest is not None:
            try:
                self.validate([(m.name, m.dtype, m.shape) for m in hello.manifest], hello.partial, hello.allow_unused)
            except ValueError as exc:
                _send_error(channel, -1, f"update rejected: {exc}")
                raise UpdateFailed(f"update rejected: {exc}") from exc
        _send_ok(channel, Reply(seq=-1, ok=True))

        while True:
            msg = self._recv(channel, "bucket")
            if isinstance(msg, Abort):
                raise UpdateFailed(f"loader aborted the update: {msg.reason}")
            if isinstance(msg, Finish):
                self._finish(channel, msg)
                return
            if not isinstance(msg, BucketReady):
                raise UpdateFailed(f"unexpected {type(msg).__name__} during an update")
            self._load_bucket(channel, msg)

    def _load_bucket(self, channel: Channel, msg: BucketReady) -> None:
        t0 = time.perf_counter()
        try:
            self._map_for(msg)
            views = bucket_views(msg, self.buffers)
            if self.verify:
                self._verify(msg, views)
            if not self.touched_weights:
                self.touched_weights = True
                self.prepare()
            self.load_weights(views)
            if self.device.type == "cuda":
                # the loader refills this buffer as soon as we acknowledge: our copies must be done
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as exc:
            _send_error(channel, msg.seq, f"{type(exc).__name__}: {exc}")
            raise UpdateFailed(f"loading bucket {msg.seq} failed: {type(exc).__name__}: {exc}") from exc
        elapsed = time.perf_counter() - t0
        self.stats.buckets += 1
        self.stats.tensors += len(views)
        self.stats.bytes += sum(v.nbytes for _, v in views)
        self.stats.load_s += elapsed
        del views
        _send_ok(channel, Reply(seq=msg.seq, ok=True, elapsed_s=elapsed))

    def _verify(self, msg: BucketReady, views: list[tuple[str, torch.Tensor]]) -> None:
        """Check every tensor's bytes against the loader's digest before anything is written."""
        if msg.digests is None:
            raise ProtocolError(f"bucket {msg.seq} carries no digests although the loader asked for verification")
        for (name, view), slot, expected in zip(views, msg.tensors, msg.digests):
            flat = view.reshape(-1).view(torch.uint8).cpu()
            digest = tensor_digest(flat)
            if digest != expected:
                raise ProtocolError(f"checksum mismatch on tensor {name!r} in bucket {msg.seq}: the bytes changed "
                                    "between the loader and the server (memory corruption or a concurrent writer)")  # fmt: skip
            self.digests.add(name, slot.dtype, slot.shape, digest)

    def _finish(self, channel: Channel, msg: Finish) -> None:
        self._unmap()  # release the loader's memory before post-processing (peak memory)
        t0 = time.perf_counter()
        self.touched_weights = True
        try:
            self.post_process()
        except Exception as exc:
            _send_error(channel, msg.seq, f"post-processing failed: {exc}")
            raise UpdateFailed(f"post-load processing failed: {type(exc).__name__}: {exc}") from exc
        self.stats.post_s = time.perf_counter() - t0
        if self.verify:
            self.stats.fingerprint = self.digests.hexdigest()
        _send_ok(channel, Reply(seq=msg.seq, ok=True, elapsed_s=self.stats.post_s))

    def _map_for(self, msg: BucketReady) -> None:
        """Page-cache mode: map just this bucket's byte range of its file, dropping the previous range, so the
        rank's memory grows by about one bucket whatever the checkpoint size."""
        index = msg.buffer
        if not 0 <= index < len(self.handles) or not isinstance(self.handles[index], FileHandle):
            return
        for i, b in enumerate(self.buffers):
            if b is not None and isinstance(self.handles[i], FileHandle):
                b.close()
                self.buffers[i] = None
        if msg.tensors:
            start = min(s.offset for s in msg.tensors)
            end = max(s.offset + getattr(torch, s.dtype).itemsize * math.prod(s.shape) for s in msg.tensors)
            self.buffers[index] = open_file_range(self.handles[index], start, end)

    def _unmap(self) -> None:
        for b in self.buffers:
            if b is None:
                continue
            try:
                b.close()
            except BufferError:  # a view is still referenced somewhere; the mapping goes with it
                logger.warning("a bucket view outlived its update; its mapping is freed when it is collected")
        self.buffers = []
