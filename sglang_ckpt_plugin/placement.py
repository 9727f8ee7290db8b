"""Where the server's ranks run, and where a loader must put its buffers to reach them.

The server publishes in ``/model_info`` (``ckpt_plugin``) its device kind and, per rank, the key that rank
answers to: ``GPU-<uuid>`` on CUDA (the same GPU whatever ``CUDA_VISIBLE_DEVICES`` or ``--base-gpu-id`` say),
``cpu-tp<r>`` on CPU (``cpu-dp<d>-tp<r>`` with data-parallel replicas, ``cpu-pp<s>-tp<r>`` with pipeline
stages). Its ranks are every TP rank of every pipeline stage of every replica, replica by replica and stage by
stage: a ``--tp 2 --dp 2`` server has four, so has ``--tp 2 --pp-size 2``, and a loader feeds each the same
update (each rank's ``load_weights`` keeps what it holds). A loader rank follows that, not its own machine:

- server on CPU: shared-memory buffers (``--device cuda`` is refused: a CPU rank cannot open CUDA IPC handles);
- server on CUDA: a CUDA buffer on the very GPU the TP rank uses (found by UUID among the GPUs this process
  sees), shared by CUDA IPC; where that GPU is not visible, ``--device auto`` falls back to shared memory (the
  rank copies host -> device inside ``load_weights``, as SGLang's own disk loader does) and ``--device cuda``
  fails with what to change.

Pure functions of what the server said and what this process sees, so that the rules are tested on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

PLUGIN_MARKER = "ckpt_plugin"  # key our plugin adds to /model_info


@dataclass(frozen=True)
class ServerPlacement:
    device: str | None  # "cuda" / "cpu"; None from a plugin that did not publish it
    rank_keys: list[str] = field(default_factory=list)
    tp_size: int = 1
    dp_size: int = 1  # data-parallel replicas (--dp), each its own TP group
    pp_size: int = 1  # pipeline stages, each its own TP group
    attn_dp_size: int = 1  # data-parallel attention groups (--enable-dp-attention)
    peer_access: bool = False  # every TP rank's GPU reads every other's memory peer to peer (NVLink / PCIe P2P)

    @classmethod
    def from_model_info(cls, info: dict) -> ServerPlacement:
        plugin = info.get(PLUGIN_MARKER) or {}
        return cls(
            device=plugin.get("device"),
            rank_keys=list(plugin.get("rank_keys") or []),
            tp_size=int(plugin.get("tp_size") or 1),
            dp_size=int(plugin.get("dp_size") or 1),
            pp_size=int(plugin.get("pp_size") or 1),
            attn_dp_size=int(plugin.get("attn_dp_size") or 1),
            peer_access=bool(plugin.get("peer_access")),
        )

    @property
    def rank_count(self) -> int:
        """Ranks a loader feeds on this server: every TP rank of every pipeline stage of every replica."""
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def shape(self) -> str:
        sizes = [("tp", self.tp_size), ("pp", self.pp_size), ("dp", self.dp_size)]
        return " x ".join(f"{name} {size}" for name, size in sizes if size > 1 or name == "tp")

    def key_of(self, rank: int) -> str | None:
        """The key of server rank ``rank`` (replica by replica, stage by stage, then TP rank)."""
        return self.rank_keys[rank] if rank < len(self.rank_keys) else None


@dataclass(frozen=True)
class LoaderPlacement:
    kind: str  # "cuda" / "cpu": where this loader rank's buffers live
    gpu_index: int | None  # local CUDA index (of this process's visible GPUs) when kind == "cuda"
    rank_key: str  # the key of the server rank this loader rank feeds
    note: str | None = None  # said once when the choice is not the obvious one (a fallback)


def choose_placement(
    choice: str, server: ServerPlacement, tp_rank: int, local_rank: int, local_gpus: list[str]
) -> LoaderPlacement:
    """``choice``: --device (auto/cpu/cuda). ``local_gpus``: ``GPU-<uuid>`` of every GPU this process sees,
    by local index. Raises ValueError for what cannot work, saying what to change."""
    if server.device == "cpu":
        if choice == "cuda":
            raise ValueError(
                "--device cuda, but the server runs on CPU: its ranks cannot open CUDA IPC buffers; "
                "use --device cpu (or auto)"
            )
        return LoaderPlacement("cpu", None, server.key_of(tp_rank) or f"cpu-tp{tp_rank}")
    if server.device == "cuda":
        want = server.key_of(tp_rank)
        if want is None:
            raise ValueError(
                f"the server published no GPU for TP rank {tp_rank} (rank_keys: {server.rank_keys}); "
                "is --inference-parallel-size the server's --tp?"
            )
        if choice == "cpu":
            return LoaderPlacement(
                "cpu",
                None,
                want,
                "--device cpu: shared-memory buffers; the server copies them to its GPUs (slower than CUDA IPC)",
            )
        if want in local_gpus:
            return LoaderPlacement("cuda", local_gpus.index(want), want)
        if choice == "cuda":
            raise ValueError(
                f"TP rank {tp_rank} of the server runs on {want}, which this loader rank does not see "
                f"(it sees {local_gpus or 'no GPU'}): run the loader on the server's node with that GPU "
                "visible (CUDA_VISIBLE_DEVICES), or use --device cpu"
            )
        return LoaderPlacement(
            "cpu",
            None,
            want,
            f"{want} (TP rank {tp_rank}) is not visible here: shared-memory buffers, the server copies them to its GPU",
        )
    # A server that did not say (older plugin): this machine decides, one GPU per local rank.
    if choice == "cpu" or (choice == "auto" and not local_gpus):
        return LoaderPlacement("cpu", None, f"cpu-tp{tp_rank}")
    if not local_gpus:
        raise ValueError("--device cuda but no CUDA device is visible")
    if local_rank >= len(local_gpus):
        raise ValueError(
            f"local rank {local_rank} has no GPU of its own ({len(local_gpus)} visible): NCCL needs one "
            "GPU per loader rank; start at most as many ranks per node as GPUs"
        )
    return LoaderPlacement("cuda", local_rank, local_gpus[local_rank])


def peer_unreadable(
    own_key: str, peer_key: str, visible: list[str], can_access: Callable[[int, int], bool]
) -> str | None:
    """Why a rank on GPU ``own_key`` cannot read memory on GPU ``peer_key`` (None: it can), with ``visible`` this
    process's GPUs by index and ``can_access(own_index, peer_index)`` the driver's answer (torch's
    ``can_device_access_peer``). The rank opens such a buffer with its own device current, so no context is made on
    the peer GPU."""
    if peer_key == own_key:
        return None
    if peer_key not in visible or own_key not in visible:
        return f"{peer_key} is not visible to the rank on {own_key} (CUDA_VISIBLE_DEVICES)"
    if not can_access(visible.index(own_key), visible.index(peer_key)):
        return f"{own_key} cannot read {peer_key}'s memory peer to peer (no NVLink / PCIe P2P between them)"
    return None


def node_local_problem(server: ServerPlacement, local_gpus: list[str]) -> str | None:
    """Why one loader process cannot feed every TP rank of this GPU server from buffers on TP rank 0's GPU, each
    rank copying its slice from there peer to peer (None: it can). Then each loader rank feeds its own TP rank and
    every GPU receives every bucket (a broadcast between loader ranks)."""
    if server.device == "cuda" and server.dp_size > 1:
        return "the server runs data-parallel replicas (each replica's GPUs are fed by their own loader ranks)"
    if server.device == "cuda" and server.pp_size > 1:
        return "the server runs pipeline stages (each stage's GPUs are fed by their own loader ranks)"
    if server.device != "cuda" or server.tp_size < 2:
        return "not a GPU server with several TP ranks"
    if len(server.rank_keys) != server.tp_size:
        return "the server did not publish every TP rank's GPU (an older plugin?)"
    if not server.peer_access:
        return (
            "the server's GPUs cannot all read each other's memory peer to peer (no NVLink / PCIe P2P between some of "
            "them, or a server plugin that predates peer_access)"
        )
    unseen = [key for key in server.rank_keys if key not in local_gpus]
    if unseen:
        return f"this loader process does not see the server's GPUs {unseen} (CUDA_VISIBLE_DEVICES)"
    return None


def shared_gpus(node_keys: list[tuple[int, str]]) -> str | None:
    """Loader ranks (node, key) that would share one GPU: NCCL refuses that ("Duplicate GPU detected")."""
    seen: dict[tuple[int, str], int] = {}
    for rank, (node, key) in enumerate(node_keys):
        if not key.startswith("GPU-"):
            continue
        if (node, key) in seen:
            return (
                f"loader ranks {seen[(node, key)]} and {rank} would both use {key}: NCCL needs one GPU per rank; "
                "start at most as many loader ranks per node as the server has GPUs there"
            )
        seen[(node, key)] = rank
    return None


def trainer_gpu(server: ServerPlacement, local_gpus: list[str]) -> int:
    """A local GPU for a trainer's NCCL group that none of the server's TP ranks uses (NCCL refuses two ranks of
    one group on one GPU). Raises ValueError when every visible GPU belongs to the server."""
    taken = set(server.rank_keys)
    for index, key in enumerate(local_gpus):
        if key not in taken:
            return index
    raise ValueError(
        f"every GPU this trainer sees ({local_gpus}) is used by the server's TP ranks: an NCCL group "
        "cannot hold two ranks on one GPU; give the trainer its own GPU (CUDA_VISIBLE_DEVICES), or push "
        "with LocalPush (CUDA IPC, same GPU) instead"
    )
