"""Move each bucket from the loader rank that reads it to every loader rank that feeds an inference rank.

Every rank walks the same list of steps. For a step, the owner reads the bucket from disk straight into its
send buffer (its own shared bucket buffer when it feeds a server too) and sends it over the one data group
(the world: NCCL on CUDA, gloo on CPU); receivers get the bytes straight into their shared bucket buffer, which
their server then reads. Broadcast mode: every rank receives (a broadcast over the world). P2P mode: only the
listed ranks receive, by point-to-point sends from the owner on that same group (no communicator per owner), or,
with a Mooncake link (p2p_link.py), by each receiver reading the bucket out of the owner's registered buffer.

On CUDA a collective only orders the stream; ``move`` returns once the bytes have landed, because the next thing
a receiver does is tell its server to read them, and the next thing an owner does is refill its buffer. While it
waits it listens for a peer's alarm: a rank whose NCCL call failed says so, and its peers abort the communicator
and stop at once instead of waiting inside the collective for the watchdog.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..transport.handles import device_kind
from .filler import BucketFiller
from .p2p_link import MooncakeLink
from .plan import Step
from .rank_setup import PeerFailed
from .world import LoaderWorld, PeerAlarm, peers_lost_reason

if TYPE_CHECKING:  # one process alone moves nothing: it fills its shared buffers without importing torch
    import torch


class Exchange:
    def __init__(
        self,
        world: LoaderWorld,
        receivers: list[int],
        device: torch.device | str | None,
        group=None,
        alarm: PeerAlarm | None = None,
        link: MooncakeLink | None = None,
    ):
        """Collective and cheap: every rank makes it before any rank allocates buffers or measures its free
        memory (an allocation that fails on one rank must not leave the others inside a collective; NCCL's
        communicator and p2p connections take device memory the budget must see). ``group``: the data group
        (None: default); ``alarm``: how ranks tell each other of a failed NCCL call; ``link``: p2p moves are
        Mooncake reads (every rank then walks every step: the owner's note and the agreement are collectives)."""
        self.world = world
        self.receivers = set(receivers)
        self.device = device
        self.group = group
        self.alarm = alarm
        self.link = link
        self.everyone = set(range(world.world_size))
        self.cuda = device_kind(device) == "cuda"
        self._private: list[torch.Tensor] = []  # a source-only rank reads into these
        self.bytes_received = 0  # bucket bytes that came from another loader process
        if world.distributed and self.cuda and link is None:
            self._guarded(self._connect)

    def data(self, buffer):
        """What a bucket is read into: a shared-memory buffer's memoryview where nothing moves between processes
        (no torch needed), otherwise the buffer's tensor (torch.distributed sends it)."""
        view = getattr(buffer, "view", None)
        return view if view is not None and not self.world.distributed else buffer.tensor

    def _connect(self) -> None:
        """NCCL makes its communicator on first use, which must be collective (p2p ops otherwise hang), and its
        connections on the first call of each kind and size class: make the ones the moves will use now, before
        the memory budget is measured. Broadcasts (every rank receives): one the size of a bucket's bulk protocol;
        otherwise every owner -> receiver p2p pair."""
        import torch
        import torch.distributed as dist

        def op(kind, peer: int):
            return dist.P2POp(kind, torch.zeros(1, device=self.device), peer, group=self.group)

        dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
        if self.receivers == self.everyone:
            warm = torch.empty(WARM_UP_BROADCAST_BYTES, dtype=torch.uint8, device=self.device)
            dist.broadcast(warm, src=0, group=self.group)
            del warm
        else:
            others = self.everyone - {self.world.rank}
            ops = [op(dist.isend, peer) for peer in sorted(self.receivers & others)]
            if self.world.rank in self.receivers:
                ops += [op(dist.irecv, peer) for peer in sorted(others)]
            for request in dist.batch_isend_irecv(ops) if ops else []:
                request.wait()

    def allocate(self, bucket_bytes: int, count: int = 1) -> None:
        """A source only (no server of its own): ``count`` private buffers to read into (two phases: one per bucket
        it owns, so it reads all of them ahead, at the same time as the other ranks read theirs)."""
        if self.world.rank not in self.receivers:
            import torch

            self._private = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(count)]

    def register(self, buffers: list) -> None:
        """With a Mooncake link: this rank's buffers (``buffers``, its shared bucket buffers, and its private ones),
        which peers read from and it reads into. Without one nothing is touched (a one-process CPU loader never
        imports torch, which a shared buffer's ``.tensor`` would)."""
        if self.link is not None:
            tensors = [*(b.tensor for b in buffers), *self._private]
            self.link.engine.register([(t.data_ptr(), t.numel() * t.element_size()) for t in tensors])

    def release(self) -> None:
        """The buffers go; a Mooncake engine unregisters them and ends (its threads and ports) first."""
        if self.link is not None:
            self.link.close()
        self._private = []

    def private_buffer(self, index: int) -> torch.Tensor:
        return self._private[index]

    def takes_part(self, step: Step) -> bool:
        return self.link is not None or self.world.rank == step.owner or self.world.rank in self.receivers

    def read(
        self, step: Step, filler: BucketFiller, dest: torch.Tensor | memoryview | None, digests: bool
    ) -> tuple[torch.Tensor | memoryview, list[int] | None]:
        """Owner only: fill the bucket; returns (the buffer to send from, the digests when asked)."""
        buffer = dest if dest is not None else self._private[0]
        return buffer, filler.fill(step.bucket, buffer, digests)

    def move(self, step: Step, buffer: torch.Tensor, digests: list[int] | None, verify: bool) -> list[int] | None:
        """Send the bucket (and its digests) from its owner into ``buffer`` on every receiver."""
        if self.receivers | {step.owner} == {step.owner}:  # one rank reads and feeds: nothing to move
            return digests
        if self.link is not None:
            return self._read_from_owner(step, buffer, digests)

        import torch

        def send() -> list[int] | None:
            self._send(step.owner, buffer[: step.bucket.nbytes])
            if self.world.rank != step.owner:
                self.bytes_received += step.bucket.nbytes
            if not verify:
                return digests
            wire = torch.zeros(len(step.bucket.slots), dtype=torch.int64, device=buffer.device)
            if self.world.rank == step.owner:
                wire.copy_(torch.tensor([_signed(d) for d in digests], dtype=torch.int64))
            self._send(step.owner, wire)
            self._landed()  # before the host reads the wire
            return [d & 0xFFFFFFFFFFFFFFFF for d in wire.cpu().tolist()]

        return self._guarded(send)

    def _read_from_owner(self, step: Step, buffer, digests: list[int] | None) -> list[int] | None:
        """Mooncake: the owner says where the bucket is (and its digests); each receiver reads it from there; then
        every rank agrees, so the owner refills that buffer only after every reader is done, and a failed read
        stops every rank at this step."""
        link, rank = self.link, self.world.rank
        note = json.dumps({"ptr": buffer.data_ptr(), "digests": digests}) if rank == step.owner else ""
        said = json.loads(link.control.broadcast_str(note, src=step.owner))
        error = None
        if rank in self.receivers and rank != step.owner:
            try:
                link.engine.read(link.sessions[step.owner], buffer.data_ptr(), said["ptr"], step.bucket.nbytes)
                self.bytes_received += step.bucket.nbytes
            except OSError as exc:
                error = exc
        if link.control.any_failed(error is not None):
            raise error or PeerFailed(f"another loader rank's Mooncake read of bucket {step.seq} failed")
        return said["digests"]

    def _guarded(self, calls):
        """Run data-group calls and wait until they landed (CUDA). A call that fails here sounds the alarm; a peer's
        alarm heard while waiting aborts this rank's communicator (its collective can never finish)."""
        if self.alarm is None:
            return calls()
        try:
            result = calls()
            self._landed()
            return result
        except PeerFailed:
            raise
        except Exception as exc:
            self.alarm.sound(f"loader rank {self.world.rank}: {type(exc).__name__}: {exc}")
            raise

    def _landed(self) -> None:
        if not self.cuda:
            return
        import torch
        import torch.distributed as dist

        if self.alarm is None:
            torch.cuda.current_stream(self.device).synchronize()
            return
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(self.device))
        reason = self.alarm.wait(landed.query)
        if reason is not None:
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                abort(self.group)
            raise PeerFailed(f"another loader rank's NCCL call failed ({reason}); its communicator here was aborted")

    def _send(self, owner: int, tensor: torch.Tensor) -> None:
        try:
            self._send_or_recv(owner, tensor)
        except RuntimeError as exc:
            import torch.distributed as dist

            # gloo (host buckets) fails a collective only when a peer's connection broke or stalled; a CUDA error is
            # not a network failure unless torch says so
            if not ("Timed out" in str(exc) or not self.cuda or isinstance(exc, dist.DistNetworkError)):
                raise
            what = f"a bucket from loader rank {owner} did not move between the loader ranks"
            raise PeerFailed(peers_lost_reason(what, exc)) from None

    def _send_or_recv(self, owner: int, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.receivers | {owner} == self.everyone:
            dist.broadcast(tensor, src=owner, group=self.group)
            return
        if self.world.rank == owner:
            ops = [dist.P2POp(dist.isend, tensor, peer, group=self.group) for peer in sorted(self.receivers - {owner})]
        else:
            ops = [dist.P2POp(dist.irecv, tensor, owner, group=self.group)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()


WARM_UP_BROADCAST_BYTES = 8 << 20  # large enough for NCCL's bulk (Simple) protocol, which buckets use


def _signed(u64: int) -> int:
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64
