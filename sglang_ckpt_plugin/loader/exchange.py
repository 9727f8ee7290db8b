"""Move each bucket from the loader rank that reads it to every loader rank that feeds an inference rank.

Every rank walks the same list of steps. For a step, the owner reads the bucket from disk straight into its
send buffer (its own shared-memory bucket buffer when it feeds a server too) and broadcasts it with
torch.distributed over the group {owner} + receivers; receivers get the bytes straight into their shared
bucket buffer, which their server then reads. Broadcast mode: every rank receives (the group is the world).
P2P mode: only the listed ranks receive; data come from whichever rank read them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .plan import Step
from .reader import BucketFiller
from .world import LoaderWorld


class Exchange:
    def __init__(self, world: LoaderWorld, receivers: list[int], device: torch.device, bucket_bytes: int):
        self.world = world
        self.receivers = set(receivers)
        self.device = device
        self.groups: dict[int, object] = {}
        if world.distributed:
            # new_group is collective: every rank creates every owner's group, in the same order.
            everyone = list(range(world.world_size))
            for owner in everyone:
                members = sorted(self.receivers | {owner})
                group = None if members == everyone else dist.new_group(members)
                if world.rank in members:
                    self.groups[owner] = group
        self._staging = None
        if world.rank not in self.receivers:  # a source only: reads into a private buffer
            self._staging = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)

    def takes_part(self, step: Step) -> bool:
        return self.world.rank == step.owner or self.world.rank in self.receivers

    def read(self, step: Step, filler: BucketFiller, dest: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Owner only: fill the bucket; returns (the buffer to send from, the bytes in host memory)."""
        buffer = dest if dest is not None else self._staging
        return buffer, filler.fill(step.bucket, buffer)

    def move(self, step: Step, buffer: torch.Tensor, digests: list[int] | None, verify: bool) -> list[int] | None:
        """Broadcast the bucket (and its digests) from its owner into ``buffer`` on every receiver."""
        members = self.receivers | {step.owner}
        if len(members) == 1:  # one rank reads and feeds: nothing to move
            return digests
        group = self.groups[step.owner]
        nbytes = step.bucket.nbytes
        dist.broadcast(buffer[:nbytes], src=step.owner, group=group)
        if verify:
            wire = torch.zeros(len(step.bucket.slots), dtype=torch.int64, device=buffer.device)
            if self.world.rank == step.owner:
                wire.copy_(torch.tensor([_signed(d) for d in digests], dtype=torch.int64))
            dist.broadcast(wire, src=step.owner, group=group)
            digests = [d & 0xFFFFFFFFFFFFFFFF for d in wire.cpu().tolist()]
        return digests


def _signed(u64: int) -> int:
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64
