"""The loader's process world: torchrun's environment, the torch.distributed groups, small control collectives.

Under torchrun, one loader process per inference rank: loader rank ``r`` stands for TP rank ``r % P`` of inference
instance ``r // P`` (P = ``--inference-parallel-size``); torchrun places ranks node by node, so with P GPUs per
node each node's loader ranks stand for the instance on that node. Who feeds which server rank is decided once, in
route.py (outside torchrun: the one process, ``feeds_instance``, feeds every rank of its instance).

Two groups: a gloo group (the default one) carries control (health flags, names) and, on CPU, buckets; on CUDA
an NCCL group over the same ranks carries buckets, once every rank agreed that its buffers are on its GPU.
Strings travel as fixed-size byte tensors: nothing is pickled. With one rank there are no groups and no torch
import at all (the one-rank CPU page-cache push starts in a fraction of a second).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderWorld:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    parallel_size: int = 1  # ranks per inference instance (the server's tp size)
    feeds_instance: bool = False  # one process, no torchrun: it feeds every rank of its (one) instance

    @classmethod
    def from_env(cls, parallel_size: int, feeds_instance: bool = False) -> LoaderWorld:
        env = os.environ
        world = cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            parallel_size=parallel_size,
            feeds_instance=feeds_instance,
        )
        if feeds_instance:
            if world.world_size != 1:
                raise ValueError("one loader process feeds every rank of an instance only outside torchrun")
            return world
        if world.world_size % parallel_size:
            raise ValueError(
                f"{world.world_size} loader ranks cannot feed instances of --inference-parallel-size {parallel_size}: "
                "the number of loader ranks (nodes x --nproc-per-node) must be a multiple of it"
            )
        return world

    @classmethod
    def of_node(cls, parallel_size: int, nnodes: int = 1, node_rank: int = 0) -> LoaderWorld:
        """The world torchrun starts on this node, seen from its first rank: a loader rank per TP rank on each of
        ``nnodes`` nodes (one instance per node), this one ``node_rank``."""
        n = parallel_size
        return cls(n * node_rank, n * nnodes, 0, n, node_rank, parallel_size)

    def node_ranks(self) -> list[LoaderWorld]:
        """Every loader rank of this rank's node, as seen from itself."""
        first = self.rank - self.local_rank
        return [
            LoaderWorld(first + i, self.world_size, i, self.local_world_size, self.node_rank, self.parallel_size)
            for i in range(self.local_world_size)
        ]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def instance(self) -> int:
        return self.instance_of(self.rank)

    def instance_of(self, rank: int) -> int:
        """The inference instance loader rank ``rank`` stands for (the one process outside torchrun: instance 0)."""
        return rank // self.parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.parallel_size

    @property
    def is_leader(self) -> bool:
        """The first rank of an instance makes that instance's HTTP call."""
        return self.tp_rank == 0

    def instance_ranks(self, instance: int | None = None) -> list[int]:
        first = (self.instance if instance is None else instance) * self.parallel_size
        return list(range(first, first + self.parallel_size))

    @property
    def num_instances(self) -> int:
        return 1 if self.feeds_instance else self.world_size // self.parallel_size


class PeersLost(RuntimeError):
    """A collective of the loader ranks failed: another rank's process, node or link is gone or stalled."""


def peers_lost_reason(what: str, exc: BaseException) -> str:
    """What to tell the user when ``what`` failed in a collective because of ``exc`` (a timeout, or a connection that
    broke: a peer's process killed, its node or link gone)."""
    within = " within --timeout" if "Timed out" in str(exc) else ""
    return f"{what}{within}: a node's link, machine or loader is down or stalled ({exc})"


class Control:
    """Collectives over the gloo control group (the default group); every method is a no-op shortcut with one
    rank. The data group is the same gloo world until every rank agreed on CUDA (``use_nccl``)."""

    def __init__(self, world: LoaderWorld, timeout_s: float):
        self.world = world
        self.group = None
        self.data_group = None  # None: the default group
        self.alarm: PeerAlarm | None = None  # NCCL only (a gloo call that a peer never joins ends at --timeout)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if not world.distributed:
            return
        import torch.distributed as dist

        dist.init_process_group(backend="gloo", timeout=self.timeout)
        self.group = dist.group.WORLD

    def use_nccl(self) -> None:
        """Collective: bucket bytes move over NCCL from now on (every rank's buffers are on its GPU). The alarm
        lets a rank whose NCCL call failed free its peers from the collective they wait in."""
        if self.world.distributed:
            import torch.distributed as dist

            alarm = PeerAlarm(dist.distributed_c10d._get_default_store())
            if self.world.rank == 0:  # a group torchrun restarted after an NCCL failure may find the old key there
                alarm.clear()  # before new_group, which no rank leaves before every rank entered it
            self.data_group = dist.new_group(backend="nccl", timeout=self.timeout)
            self.alarm = alarm

    def data_group_broken(self) -> str | None:
        """Collective, after a failed update: why the NCCL data group can carry nothing more (a rank's NCCL call
        failed and sounded the alarm; its peers aborted their communicator), on every rank alike; None if it can.
        The alarm's key stays in the store, so a group that went on would fail every later update at once."""
        reason = self.alarm.reason() if self.alarm is not None else None
        if not self.any_failed(reason is not None):
            return None
        return reason or "another loader rank's NCCL call failed (its error is printed above)"

    def any_failed(self, failed: bool) -> bool:
        """True on every rank if any rank passed True (every rank must call it at the same point)."""
        if not self.world.distributed:
            return failed
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        with self._peers("the loader ranks could not agree"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @contextlib.contextmanager
    def _peers(self, what: str):
        """A control collective that fails names why (gloo's own words kept), as ``PeersLost``."""
        try:
            yield
        except PeersLost:
            raise
        except RuntimeError as exc:
            raise PeersLost(peers_lost_reason(what, exc)) from None

    def broadcast_str(self, text: str, src: int = 0) -> str:
        if not self.world.distributed:
            return text
        from ..transport.strings import broadcast_str

        with self._peers("the loader ranks could not share a name"):
            return broadcast_str(text, src, self.world.rank == src, self.group)

    def all_gather_str(self, text: str) -> list[str]:
        if not self.world.distributed:
            return [text]
        from ..transport.strings import all_gather_str

        with self._peers("the loader ranks could not share their names"):
            return all_gather_str(text, self.group, self.world.world_size)

    def all_gather_int(self, value: int) -> list[int]:
        if not self.world.distributed:
            return [value]
        import torch
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world.world_size)]
        with self._peers("the loader ranks could not share a number"):
            dist.all_gather(out, torch.tensor([value], dtype=torch.int64), group=self.group)
        return [int(t.item()) for t in out]

    def barrier(self) -> None:
        if self.world.distributed:
            import torch.distributed as dist

            with self._peers("the loader ranks could not meet"):
                dist.barrier(group=self.group)

    def close(self) -> None:
        """Tear down together: a rank that destroys its groups while a peer still talks to it can make the
        peer's gloo threads abort the process (seen as SIGABRT at exit).

        Then let go of the groups, so that they are freed here and their worker threads joined: a gloo worker
        frees its last collective's tensors after the caller's wait returned, and that needs the GIL. Left to the
        interpreter's exit, such a worker meets a finalizing interpreter and the process aborts ("terminate
        called without an active exception")."""
        if not self.world.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            dist.monitored_barrier(group=self.group, timeout=datetime.timedelta(seconds=60))
        except RuntimeError:
            pass  # a peer is gone already: nothing left to wait for
        dist.destroy_process_group()
        self.group = self.data_group = self.alarm = None  # the last references: freeing them joins the workers


ALARM_KEY = "sglang-ckpt/data-group-failed"


class PeerAlarm:
    """A failure of one rank's data-group call, told to its peers through torchrun's store (a TCP key-value
    store that stays up while NCCL does not): a peer waiting for a collective that the failed rank will never
    finish sees it, aborts its communicator and stops, instead of waiting for the watchdog's SIGABRT."""

    def __init__(self, store):
        self.store = store

    def sound(self, reason: str) -> None:
        try:
            self.store.set(ALARM_KEY, reason.encode()[:2000])
        except Exception:  # the store is gone with rank 0: the peers' own calls fail too
            pass

    def clear(self) -> None:
        try:
            self.store.delete_key(ALARM_KEY)
        except Exception:  # a store without delete_key: a fresh group's key does not exist anyway
            pass

    def reason(self) -> str | None:
        try:
            return self.store.get(ALARM_KEY).decode() if self.store.check([ALARM_KEY]) else None
        except Exception:
            return None

    def wait(self, done: Callable[[], bool], poll_s: float = 0.0002, check_every_s: float = 0.05) -> str | None:
        """Poll ``done`` until it is true (None) or a peer sounded the alarm (its reason)."""
        next_check = time.monotonic() + check_every_s
        while not done():
            if time.monotonic() >= next_check:
                reason = self.reason()
                if reason is not None:
                    return reason
                next_check = time.monotonic() + check_every_s
            time.sleep(poll_s)
        return None
