"""Who reads what, who feeds which server rank, and how the bytes reach the servers: one decision, as a value.

``decide_route`` is the only place that decides it. It is asked three times, each time knowing more of the servers
(``Servers``), and every caller follows the ``Route`` it returns:

1. before any server answered (``early_read``): the servers' device is guessed, to pick the share read ahead (a
   wrong guess only reads other bytes ahead);
2. outside torchrun, once the server answered (``cli``): whether this one process feeds every rank of the instance
   or torchrun starts one loader rank per TP rank (``Route.one_process``);
3. on every loader rank, once every instance's leader asked its server (``rank_setup``): the route of the run; each
   update then resolves its transfer once (``Route.transfer``), when it knows the buffers' kind and the tensors.

Server rank ``g`` is TP rank ``g % P`` of instance ``g // P`` (P = ``--inference-parallel-size``). Pure functions,
no torch: tested on any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..placement import ServerPlacement, node_local_problem
from .options import LoaderOptions
from .world import LoaderWorld


@dataclass(frozen=True)
class Feeding:
    """Which loader process feeds which server ranks. ``fed[r]`` lists the server ranks loader rank ``r`` feeds (empty:
    it takes part in the control collectives only). The feeders read the checkpoint and receive buckets; nothing else
    holds buffers."""

    fed: tuple[tuple[int, ...], ...]

    @property
    def feeders(self) -> list[int]:
        return [r for r, served in enumerate(self.fed) if served]

    def feeders_on_node(self, world: LoaderWorld) -> int:
        """Feeders that hold buffers side by side in this node's memory (torchrun fills nodes rank by rank)."""
        node = world.rank // world.local_world_size
        return sum(1 for r in self.feeders if r // world.local_world_size == node)


def one_per_rank(world: LoaderWorld) -> Feeding:
    """Every loader rank feeds the server rank it stands for (GPU servers: each fills buffers on its own GPU)."""
    return Feeding(tuple((r,) for r in range(world.world_size)))


def one_per_node(world: LoaderWorld) -> Feeding:
    """The first loader rank of each instance on each node feeds every rank of that instance on that node; the
    others feed nothing. On one node one process holds the only copy; buckets cross only between nodes."""
    if world.feeds_instance:
        return Feeding((tuple(range(world.parallel_size)),))
    per_node, per_instance = world.local_world_size, world.parallel_size
    fed: list[tuple[int, ...]] = []
    for r in range(world.world_size):
        if r % per_instance and r % per_node:
            fed.append(())
            continue
        end = min((r // per_instance + 1) * per_instance, (r // per_node + 1) * per_node)
        fed.append(tuple(range(r, end)))
    return Feeding(tuple(fed))


@dataclass(frozen=True)
class Servers:
    """What the loader knows of the servers it feeds, every instance alike."""

    on_cpu: bool  # every instance's server runs on CPU (its ranks map this node's memory)
    gpu_node_local: bool = False  # GPU servers whose TP ranks read each other's memory, all seen by the node's loader

    @classmethod
    def guessed(cls, args: LoaderOptions) -> Servers:
        """Before any server answered: ``--device``, else a node without an NVIDIA driver serves on CPU."""
        if args.device != "auto":
            return cls(on_cpu=args.device == "cpu")
        return cls(on_cpu=not os.path.exists("/dev/nvidiactl"))

    @classmethod
    def seen(cls, server: ServerPlacement, args: LoaderOptions, local_gpus: list[str]) -> Servers:
        """One server as this process sees it (``local_gpus``: the GPUs it sees, looked up only for a GPU server)."""
        return cls(server.device == "cpu", node_local_problem_for(server, args, local_gpus) is None)


def fed_on_gpus(server: ServerPlacement, args: LoaderOptions) -> bool:
    """A GPU server that this loader may feed from GPU buffers (not ``--device cpu``)."""
    return server.device == "cuda" and args.device != "cpu"


def node_local_problem_for(server: ServerPlacement, args: LoaderOptions, local_gpus: list[str]) -> str | None:
    """Why one loader process per node cannot feed this GPU server's TP ranks from buffers on its first rank's GPU
    (None: it can; see ``placement.node_local_problem``)."""
    if not fed_on_gpus(server, args):
        return "not a GPU server"
    return node_local_problem(server, local_gpus)


@dataclass(frozen=True)
class Route:
    """Who feeds which server rank, and whether buckets may skip bucket buffers (the servers map the files)."""

    feeding: Feeding
    transfer_flag: str  # --transfer: auto | map | copy

    @property
    def one_process(self) -> bool:
        """One loader process feeds every server rank: nothing moves between loader processes."""
        return len(self.feeding.feeders) == 1

    def transfer(self, buffers: str, mappable: bool) -> str:
        """ "map" (the servers map the checkpoint files and copy from the page cache; with several feeders each node's
        feeder maps them for its own ranks) or "copy" (bucket buffers), for an update whose buffers are of kind
        ``buffers`` and whose tensors are ``mappable`` (every one at a viewable offset). Auto maps where one process
        feeds every rank."""
        can_map = buffers == "cpu" and mappable
        if self.transfer_flag == "map" and not can_map:
            raise ValueError(
                "--transfer map needs CPU buffers (shared memory) and dtype-aligned tensor offsets; use "
                "--transfer copy (or auto)"
            )
        maps = self.transfer_flag == "map" or (self.transfer_flag == "auto" and self.one_process)
        return "map" if can_map and maps else "copy"


def decide_route(args: LoaderOptions, world: LoaderWorld, servers: Servers) -> Route:
    """One process per node (per instance there) where all instances take the same broadcast and every server is on
    CPU (its ranks map the node's memory) or on GPUs that read each other's memory peer to peer (every rank maps the
    CUDA buffers on the node's first rank's GPU); one per rank otherwise (CUDA IPC buffers on each rank's own GPU),
    for p2p rounds (the listed loader ranks receive) and for plans saved by N ranks (each reads its saved share)."""
    one_broadcast = args.update_method == "broadcast" and not args.load_metas_file
    host_servers = servers.on_cpu and args.device != "cuda"
    per_node = world.feeds_instance or (one_broadcast and (host_servers or servers.gpu_node_local))
    return Route(one_per_node(world) if per_node else one_per_rank(world), args.transfer)
