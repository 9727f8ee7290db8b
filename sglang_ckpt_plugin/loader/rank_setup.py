"""Where a loader rank's buffers live: each instance's leader asks its server (``/model_info``), the instance's ranks
follow it, all ranks agree on one buffer kind, and the memory they may use. Collective where distributed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..placement import LoaderPlacement, ServerPlacement, choose_placement
from ..transport.handles import visible_gpu_keys
from .http import ServerClient, ServerError
from .options import LoaderOptions
from .push import PushError
from .route import Route, Servers, decide_route, fed_on_gpus, node_local_problem_for
from .world import Control, LoaderWorld

if TYPE_CHECKING:
    import torch


class PeerFailed(PushError):
    """Another loader rank failed; it printed why."""


def place_rank(
    args: LoaderOptions, world: LoaderWorld, control: Control, asked: dict
) -> tuple[Route, list[LoaderPlacement], LoaderPlacement | None]:
    """Each instance's leader asks its server where the ranks run (``/model_info``; a server spread over nodes
    answers HTTP on its first node only); the instance's ranks learn it over the control group and follow it.
    ``asked``: the leader keeps its ``client`` and the ``info`` it read there (the update's layout check uses it).
    Returns the run's route (who feeds which server rank), the placement of each server rank this process feeds
    (none: it only takes part in the collectives), and this process's own (its buffers' device; a GPU for NCCL
    where it feeds none)."""
    server, error = None, None
    try:
        if world.is_leader:
            asked["client"] = ServerClient(args.endpoint, uds=args.uds, timeout_s=args.timeout, api_key=args.api_key)
            asked["info"] = asked["client"].wait_until_listening()
            server = ServerPlacement.from_model_info(asked["info"])
    except (ServerError, ValueError, OSError) as exc:
        error = exc
    if control.any_failed(error is not None):
        raise error or PeerFailed("another loader rank could not ask its server (its error is printed above)")
    server = from_instance_leader(server, world, control)
    cpu_servers = not control.any_failed(server.device != "cpu")  # every instance's server is on CPU
    look_for_gpus = args.device != "cpu" and server.device != "cpu"  # a CPU server needs no GPU (nor torch)
    gpus = visible_gpu_keys() if look_for_gpus else []
    node_local = gpu_node_local(args, world, control, server, gpus)
    route = decide_route(args, world, Servers(cpu_servers, node_local))
    feeding = route.feeding
    placements, own = [], None
    try:
        if world.feeds_instance and server.device != "cpu" and not node_local:
            raise ValueError(
                "one loader process feeds every TP rank of a GPU server only where it sees every GPU and they read "
                "each other's memory peer to peer: run one loader rank per TP rank (torchrun)"
            )
        fed = [g % world.parallel_size for g in feeding.fed[world.rank]]
        placements = [choose_placement(args.device, server, tp, world.local_rank, gpus) for tp in fed]
        own = placements[0] if placements else None
        if own is None and node_local:  # feeds nothing, but NCCL needs a GPU of its own: its TP rank's
            own = choose_placement(args.device, server, world.tp_rank, world.local_rank, gpus)
    except ValueError as exc:
        error = exc
    if control.any_failed(error is not None):
        raise error or PeerFailed("another loader rank cannot place its buffers (its error is printed above)")
    if placements and placements[0].note and not args.quiet:
        print(f"[sglang-ckpt rank {world.rank}] {placements[0].note}", file=sys.stderr)
    return route, placements, own


def gpu_node_local(
    args: LoaderOptions, world: LoaderWorld, control: Control, server: ServerPlacement, gpus: list[str]
) -> bool:
    """Whether every GPU instance is fed by one process per node from buffers on its first rank's GPU, each TP rank
    copying its slice from there peer to peer (collective: the same answer on every rank). Where a GPU server
    cannot be, each loader rank feeds its own TP rank and every GPU receives every bucket; said once per node."""
    problem = node_local_problem_for(server, args, gpus)
    node_local = not control.any_failed(problem is not None)
    several_gpus = fed_on_gpus(server, args) and server.tp_size > 1
    if several_gpus and problem and world.local_rank == 0 and not args.quiet:
        print(f"[sglang-ckpt] a loader rank per TP rank, every GPU receiving every bucket: {problem}", file=sys.stderr)
    return node_local


def from_instance_leader(server: ServerPlacement | None, world: LoaderWorld, control: Control) -> ServerPlacement:
    """The server's device, rank keys and peer access as this instance's leader read them (one short string per
    collective)."""
    if not world.distributed:
        return server
    leader = world.instance_ranks()[0]
    device = control.all_gather_str((server.device or "") if world.is_leader else "")[leader]
    keys = [
        control.all_gather_str((server.key_of(i) or "") if world.is_leader else "")[leader]
        for i in range(world.parallel_size)
    ]
    peers = control.all_gather_str(("1" if server.peer_access else "") if world.is_leader else "")[leader]
    keys = keys if all(keys) else []
    return ServerPlacement(device or None, keys, tp_size=world.parallel_size, peer_access=peers == "1")


def agree_on_kind(placement: LoaderPlacement | None, control: Control, world: LoaderWorld) -> LoaderPlacement:
    """Buckets move between ranks over one group, so every rank's buffers are of one kind: if any rank has to use
    shared memory (its TP rank's GPU is not visible to it), all do (a GPU rank then copies host -> device).
    ``None``: this rank feeds nothing (only where every server is on CPU) and holds no buffers."""
    own = placement or LoaderPlacement("cpu", None, "")
    kinds = control.all_gather_str(own.kind)
    if own.kind == "cuda" and "cpu" in kinds:
        if world.rank == kinds.index("cuda"):
            print(
                f"[sglang-ckpt] loader ranks {[r for r, k in enumerate(kinds) if k == 'cpu']} cannot reach their "
                "GPU by CUDA IPC: every rank uses shared memory",
                file=sys.stderr,
            )
        return LoaderPlacement("cpu", None, own.rank_key)
    return own


def torch_device(placement: LoaderPlacement) -> torch.device:
    """Made only now, once the server listens: a CUDA context made earlier would sit in SGLang's start-up
    memory profile when both start together."""
    import torch

    if placement.kind == "cuda":
        torch.cuda.set_device(placement.gpu_index)
        return torch.device("cuda", placement.gpu_index)
    return torch.device("cpu")


def host_available_memory() -> int:
    """MemAvailable in bytes (0 where /proc/meminfo cannot be read): shared memory and pinned staging count
    against it, and so does what is read ahead into the page cache."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory(placement: LoaderPlacement) -> int:
    """Bytes the buffers may take: MemAvailable, and on CUDA also the GPU's free memory (SGLang already took its
    --mem-fraction-static of it)."""
    host = host_available_memory()
    if placement.kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(placement.gpu_index)
        return min(host, free) if host else free
    return host
