"""Feed one inference rank: fill buffers, send bucket messages, wait for acknowledgements.

With ``n`` buffers, bucket ``k`` goes into buffer ``k % n`` once bucket ``k - n`` has been acknowledged, so
the loader fills the next buffer while the server loads the current one (two processes, two cores). The buffers
belong to the NodeFeeder (node_feed.py) that drives this rank's feeder, alone or beside its instance's other ranks.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from ..transport.channel import Channel, PeerGone
from ..transport.fdpass import KEPT_SUFFIX, FdInbox, FdOffer, fd_socket_path
from ..transport.handles import LentFile, give_back_ipc_reference
from ..transport.integrity import Fingerprint
from ..transport.messages import (
    PROTOCOL_VERSION,
    Abort,
    BucketReady,
    BuffersGranted,
    BuffersWanted,
    CudaIpcHandle,
    Finish,
    Hello,
    Reply,
    TensorMeta,
    TensorSlot,
)
from .plan import Bucket

logger = logging.getLogger("sglang_ckpt_plugin")


class PushError(RuntimeError):
    """The update failed; the message says where and why."""


@dataclass
class StageTimes:
    read_s: float = 0.0  # loader: checkpoint bytes -> bucket buffers
    wait_s: float = 0.0  # loader: blocked until the server freed a buffer
    load_s: float = 0.0  # server: load_weights over all buckets (from the replies)
    post_s: float = 0.0  # server: post-load processing
    total_s: float = 0.0
    bytes: int = 0
    buckets: int = 0
    extra: dict = field(default_factory=dict)


def new_update_id(checkpoint_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in checkpoint_name)[:40]
    return f"{safe}-{uuid.uuid4().hex[:8]}"


def bucket_message(seq: int, buffer: int, bucket: Bucket, digests: list[int] | None = None) -> BucketReady:
    slots = [TensorSlot(s.tensor.name, s.tensor.dtype, list(s.tensor.shape), s.offset) for s in bucket.slots]
    return BucketReady(seq=seq, buffer=buffer, tensors=slots, digests=digests)


class RankFeeder:
    """The channel to one inference rank during one update, over buffers its NodeFeeder owns."""

    def __init__(
        self,
        endpoint: str,
        update_id: str,
        timeout_s: float,
        cancelled: threading.Event,
        checksum: str = "none",
        partial: bool = False,
        allow_unused: bool = False,
        listen: bool = True,
    ):
        """Binds the endpoint at once (cheap), so the server may connect while buffers are allocated; with
        ``listen=False`` only at ``listen()`` (a two-phase update reads every bucket first: a loader killed then
        leaves no socket file behind). ``checksum`` other than "none": every bucket carries per-tensor digests of
        that kind (transport.integrity)."""
        self.update_id = update_id
        self.checksum = checksum
        self.verify = checksum != "none"
        self.partial = partial
        self.allow_unused = allow_unused
        self.digests = Fingerprint()
        self.timeout_s = timeout_s
        self.cancelled = cancelled
        self.buffers = []
        self.on_bucket = lambda bucket: None  # progress callback
        self._fd_offer: FdOffer | None = None
        # CUDA IPC handles (by buffer index) whose reference no rank gives back: this feeder does, at close()
        self._unanswered: dict[int, CudaIpcHandle] = {}
        self.written_bytes = 0  # what the server rank said, at hello, its load_weights will write (its slice)
        self.endpoint = endpoint
        self.channel: Channel | None = None
        if listen:
            self.listen()

    def listen(self) -> None:
        self.channel = Channel(self.endpoint, bind=True)

    def adopt(self, buffers: list) -> None:
        """The buffers this update hands over (their owner releases them; close() leaves them alone)."""
        self.buffers = list(buffers)

    def _wait_message(self, seq: int, what: str):
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.cancelled.is_set():
                self._rank_may_hold_handles(seq)
                raise PushError(f"update cancelled while waiting for the server to {what}")
            try:
                return self.channel.recv(timeout_s=0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    self._rank_may_hold_handles(seq)
                    raise PushError(f"server did not {what} within {self.timeout_s:g} s (--timeout)") from None
            except PeerGone:  # a rank that ended without answering gave nothing back: the references stay ours
                raise PushError(f"the server's rank disconnected before it could {what} (see the server log)") from None

    def _wait_reply(self, seq: int, what: str) -> Reply:
        msg = self._wait_message(seq, what)
        if not isinstance(msg, Reply) or msg.seq != seq:
            raise PushError(f"protocol error: expected reply to {seq}, got {msg!r}")
        if seq == -1:  # the rank gives back what it opened, whatever its answer; the others are ours to give back
            self._unanswered = {i: h for i, h in self._unanswered.items() if i not in msg.opened}
        if not msg.ok:
            raise PushError(f"server failed to {what}: {msg.error}")
        return msg

    def borrow_buffers(self, sizes: list[int]) -> LentFile | str:
        """Buffers of ``sizes`` that the server rank keeps between updates (``--keep-update-buffers``), or why it
        lends none (the caller allocates its own). Sent before the hello, on a channel the rank connects to."""
        inbox = FdInbox(fd_socket_path(self.endpoint, KEPT_SUFFIX))
        try:
            self._send_when_connected(BuffersWanted(sizes=sizes))
            answer = self._wait_message(-2, "lend its kept buffers")
            if isinstance(answer, Reply) and answer.seq == -2 and not answer.ok:
                return answer.error
            if not isinstance(answer, BuffersGranted) or len(answer.offsets) != len(sizes):
                raise PushError(f"protocol error: expected the server's kept buffers, got {answer!r}")
            try:
                (fd,) = inbox.receive(1, self.timeout_s)
            except (OSError, ValueError) as exc:
                raise PushError(f"the server's rank lent buffers but did not hand them over: {exc}") from None
        finally:
            inbox.close()
        try:
            return LentFile(fd, answer.nbytes, answer.offsets, sizes)
        except (OSError, ValueError) as exc:
            raise PushError(f"cannot map the server's kept buffers: {exc}") from None

    def _handles(self) -> tuple[list, list[int]]:
        """Wire handles of the buffers, and the descriptors (in slot order, one per file) to hand over with
        SCM_RIGHTS."""
        handles, slots = [], {}
        for b in self.buffers:
            if b.fd is not None:
                handles.append(b.handle(slot=slots.setdefault(b.fd, len(slots))))
            else:
                handles.append(b.handle())
        fds = list(slots)
        self._unanswered = {i: h for i, h in enumerate(handles) if isinstance(h, CudaIpcHandle)}
        return handles, fds

    def hello(self, buckets: list[Bucket]) -> None:
        """Open the update: the server maps the buffers and checks the manifest before anything is written."""
        self.send_hello(buckets)
        self.accept_hello()

    def send_hello(self, buckets: list[Bucket]) -> None:
        """The hello alone: the caller may fill a buffer while the server maps them and checks the manifest, and
        must ``accept_hello()`` before it sends a bucket."""
        self._in_flight: deque[int] = deque()
        handles, fds = self._handles()
        if fds:  # the rank connects for them right after the hello
            self._fd_offer = FdOffer(fd_socket_path(self.channel.endpoint), fds, self.timeout_s)
        self._send_when_connected(
            Hello(
                protocol_version=PROTOCOL_VERSION,
                update_id=self.update_id,
                buffers=handles,
                num_buckets=len(buckets),
                num_tensors=sum(len(b.slots) for b in buckets),
                total_bytes=sum(b.payload_bytes for b in buckets),
                checksum=self.checksum,
                manifest=[
                    TensorMeta(s.tensor.name, s.tensor.dtype, list(s.tensor.shape)) for b in buckets for s in b.slots
                ],
                partial=self.partial,
                allow_unused=self.allow_unused,
            )
        )

    def accept_hello(self) -> None:
        """Wait for the server's answer to the hello: it mapped the buffers and accepted the manifest."""
        try:
            self.written_bytes = self._wait_reply(-1, "accept the update").written_bytes
        finally:
            self._close_fd_offer()
        for b in self.buffers:  # the server has mapped them: drop the names so nothing can leak
            b.unlink()

    def free_buffer(self, seq: int, times: StageTimes):
        """The buffer (an OwnedBuffer) bucket ``seq`` goes into, once the server has acknowledged the bucket that
        used it last."""
        if len(self._in_flight) == len(self.buffers):
            t0 = time.perf_counter()
            times.load_s += self._wait_reply(self._in_flight.popleft(), "load a bucket").elapsed_s
            times.wait_s += time.perf_counter() - t0
        return self.buffers[seq % len(self.buffers)]

    def send_bucket(
        self, seq: int, bucket: Bucket, digests: list[int] | None, times: StageTimes, buffer: int | None = None
    ) -> None:
        if digests is not None:
            self._record_digests(bucket, digests)
        buffer = seq % len(self.buffers) if buffer is None else buffer
        try:
            self.channel.send(bucket_message(seq, buffer, bucket, digests))
        except (TimeoutError, PeerGone):
            # the rank ended the update; its last words, if they arrived, say why (so does the HTTP answer)
            raise PushError(f"the server's rank stopped taking buckets: {self._last_error()}") from None
        self._in_flight.append(seq)
        times.bytes += bucket.payload_bytes
        times.buckets += 1
        self.on_bucket(bucket)

    def _last_error(self) -> str:
        """The error reply the rank sent before it went away, if one is waiting on the socket."""
        try:
            while True:
                msg = self.channel.recv(timeout_s=0.2)
                if isinstance(msg, Reply) and not msg.ok:
                    return msg.error
        except (TimeoutError, PeerGone, ValueError):
            return "it failed the update (see the server's answer)"

    def finish(self, num_buckets: int, times: StageTimes) -> None:
        """Wait for the last buckets, then for the server's post-processing."""
        t0 = time.perf_counter()
        while self._in_flight:
            times.load_s += self._wait_reply(self._in_flight.popleft(), "load a bucket").elapsed_s
        times.wait_s += time.perf_counter() - t0
        self.channel.send(Finish(seq=num_buckets))
        times.post_s = self._wait_reply(num_buckets, "finish the update").elapsed_s

    def _record_digests(self, bucket: Bucket, digests: list[int]) -> None:
        for s, digest in zip(bucket.slots, digests):
            self.digests.add(s.tensor.name, s.tensor.dtype, s.tensor.shape, digest)

    @property
    def fingerprint(self) -> str | None:
        return self.digests.hexdigest() if self.verify else None

    def _send_when_connected(self, msg) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.cancelled.is_set():
                raise PushError("update cancelled before the server connected")
            try:
                return self.channel.send(msg, timeout_s=0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise PushError(
                        f"server did not connect to {self.channel.endpoint} within {self.timeout_s:g} s"
                    ) from None

    def abort(self, reason: str) -> None:
        if self.channel is not None:
            try:
                self.channel.send(Abort(reason=reason[:2000]), timeout_s=0.5)
            except Exception:
                pass

    def _rank_may_hold_handles(self, seq: int) -> None:
        """No answer to the hello from a live rank: it may have opened any of the handles, and gives those back
        when it closes them. Giving one back here too could free a buffer the rank still reads; the buffers stay
        allocated until this process ends instead."""
        if seq == -1 and self._unanswered:
            logger.warning(
                "the server's rank did not answer the hello: %d CUDA IPC buffer(s) stay allocated until "
                "this loader process ends",
                len(self._unanswered),
            )
            self._unanswered = {}

    def _close_fd_offer(self) -> None:
        if self._fd_offer is not None:
            self._fd_offer.close()
            self._fd_offer = None

    def close(self) -> None:
        self._close_fd_offer()
        for handle in self._unanswered.values():  # no rank took these: their counters would keep the buffers allocated
            give_back_ipc_reference(handle)
        self._unanswered = {}
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.buffers = []
