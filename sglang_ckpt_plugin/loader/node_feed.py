"""One process feeding every inference rank of its instance on this node, from one set of buffers.

Each TP rank maps the same memory (the checkpoint files in page-cache mode, or shared bucket buffers handed over
as descriptors) and its own ``load_weights`` copies only its slice: nothing is copied between loader processes
and each bucket is filled once per node. The loader CLI takes this path for a CPU server of any TP size (no
torchrun, no torch: the files, or shared buffers filled through a memoryview); ``LocalPush`` feeds a TP server
through it too, and a torchrun rank feeds its one rank through a NodeFeeder of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..transport.handles import FileBuffer, allocate_buffer
from .plan import Bucket
from .push import RankFeeder, StageTimes

if TYPE_CHECKING:
    import torch


class NodeFeeder:
    """The RankFeeders of one instance's ranks, driven as one: each bucket goes to every rank; a buffer is refilled
    once every rank acknowledged the bucket that used it last. Stage times: the slowest rank's load."""

    def __init__(self, feeders: Iterable[RankFeeder] = ()):
        self.feeders: list[RankFeeder] = []
        self._rank_times: list[StageTimes] = []
        self.buffers: list = []
        self.owns_buffers = False
        self.wanted: list[int] = []  # buffer sizes to borrow from the first rank at the hello
        self.device = None
        self.lent = None  # the first rank's kept buffer file, while this update borrows it
        self.buffer_source = ""  # how this update got its buffers, for the report
        for f in feeders:
            self.add(f)

    def add(self, feeder: RankFeeder) -> None:
        self.feeders.append(feeder)
        self._rank_times.append(StageTimes())

    @property
    def endpoints(self) -> list[str]:
        return [f.endpoint for f in self.feeders]

    @property
    def fingerprint(self) -> str | None:
        return self.feeders[0].fingerprint

    @property
    def on_bucket(self):
        return self.feeders[0].on_bucket

    @on_bucket.setter
    def on_bucket(self, callback) -> None:  # progress: once per bucket, not once per rank
        self.feeders[0].on_bucket = callback

    def listen(self) -> None:
        for f in self.feeders:
            f.listen()

    def allocate(
        self, bucket_bytes: int, num_buffers: int, device: torch.device | str | None, borrow: bool = False
    ) -> None:
        """Buffers every rank maps, handed over by descriptor: no name to leak if this process is killed, and none
        that would have to outlive the first rank's mapping until the last rank mapped it. ``borrow``: ask the
        first rank for the buffers it keeps between updates (``--keep-update-buffers``) at the hello, and allocate
        only if it lends none."""
        self.device = device
        self.owns_buffers = True
        if borrow:
            self.wanted = [bucket_bytes] * num_buffers
            return
        self.adopt([allocate_buffer(bucket_bytes, device, reusable=True) for _ in range(num_buffers)])
        self.buffer_source = "allocated by the loader"

    def _borrow(self) -> None:
        lent = self.feeders[0].borrow_buffers(self.wanted)
        if isinstance(lent, str):  # declined: this update allocates its own
            sizes, self.wanted = self.wanted, []
            self.adopt([allocate_buffer(size, self.device, reusable=True) for size in sizes])
            self.buffer_source = f"allocated by the loader (the server lent none: {lent})"
            return
        self.lent, self.wanted = lent, []
        self.adopt(lent.buffers)
        self.buffer_source = "kept by the server between updates, lent to this one"

    def adopt(self, buffers: list) -> None:
        self.buffers = list(buffers)
        for f in self.feeders:
            f.adopt(self.buffers)

    def hello(self, buckets: list[Bucket]) -> None:
        self.send_hello(buckets)
        self.accept_hello()

    def send_hello(self, buckets: list[Bucket]) -> None:
        if self.wanted:
            self._borrow()
        for f in self.feeders:
            f.send_hello(buckets)

    def accept_hello(self) -> None:
        for f in self.feeders:
            f.accept_hello()

    def free_buffer(self, seq: int, times: StageTimes):
        """The OwnedBuffer bucket ``seq`` goes into, once every rank acknowledged the bucket that used it last."""
        t0 = time.perf_counter()
        for f, t in zip(self.feeders, self._rank_times):
            buffer = f.free_buffer(seq, t)
        times.wait_s += time.perf_counter() - t0
        return buffer

    def send_bucket(
        self, seq: int, bucket: Bucket, digests: list[int] | None, times: StageTimes, buffer: int | None = None
    ) -> None:
        for f, t in zip(self.feeders, self._rank_times):
            f.send_bucket(seq, bucket, digests, t, buffer=buffer)
        times.bytes += bucket.payload_bytes
        times.buckets += 1

    def finish(self, num_buckets: int, times: StageTimes) -> None:
        t0 = time.perf_counter()
        for f, t in zip(self.feeders, self._rank_times):
            f.finish(num_buckets, t)
        times.wait_s += time.perf_counter() - t0
        times.load_s = max(t.load_s for t in self._rank_times)
        times.post_s = max(t.post_s for t in self._rank_times)

    def run(self, buckets: list[Bucket], fill: Callable, times: StageTimes) -> None:
        """Streaming or staged, from this process's buffers: bucket k into buffer k mod n. ``fill(bucket, buffer)``
        (an OwnedBuffer) returns the bucket's digests or None. The first bucket is filled while the ranks map the
        buffers and check the manifest; where every bucket has a buffer of its own, nothing waits for a rank until
        the end: one exchange."""
        self.send_hello(buckets)
        for seq, bucket in enumerate(buckets):
            buffer = self.free_buffer(seq, times)
            t0 = time.perf_counter()
            digests = fill(bucket, buffer)
            times.read_s += time.perf_counter() - t0
            if seq == 0:
                self.accept_hello()
            self.send_bucket(seq, bucket, digests, times)
        if not buckets:
            self.accept_hello()
        self.finish(len(buckets), times)

    def run_mapped(
        self, files: list[str], buckets: list[tuple[int, Bucket]], times: StageTimes, verify: bool = False
    ) -> None:
        """Page-cache mode: the buffers are the checkpoint files, held open read-only; every rank maps each and
        copies its slice of each tensor straight into its parameters. Nothing is refilled: every bucket goes at
        once."""
        self.adopt([FileBuffer(path) for path in files])
        self.owns_buffers = True
        self.hello([b for _, b in buckets])
        t0 = time.perf_counter()
        for seq, (index, bucket) in enumerate(buckets):
            digests = None
            if verify:
                t_read = time.perf_counter()
                digests = self.buffers[index].digests(bucket)
                times.read_s += time.perf_counter() - t_read
            self.send_bucket(seq, bucket, digests, times, buffer=index)
        times.extra["send"] = time.perf_counter() - t0
        self.finish(len(buckets), times)

    def abort(self, reason: str) -> None:
        for f in self.feeders:
            f.abort(reason)

    def close(self) -> None:
        for f in self.feeders:
            f.close()
        if self.owns_buffers:
            for b in self.buffers:
                b.release()
        if self.lent is not None:  # the server rank keeps the file; this process lets go of it
            self.lent.release()
            self.lent = None
        self.buffers = []
