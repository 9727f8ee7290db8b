"""Per scheduler (TP-rank) process: the weights state of this rank, and the one way a replica's ranks agree.

Every update path ends with ``agree(...)`` over the gloo group of every rank holding part of the model (SGLang's
TP group; with pipeline stages every stage's ranks, which handle each update together: pipeline.py) before it
records an outcome, so every rank records the same outcome and every rank's generate guard gives the same answer
(the scheduler broadcasts each request to all ranks).
"""

from __future__ import annotations

import msgspec
import torch
import torch.distributed as dist

from ..placement import peer_unreadable
from ..transport.handles import device_rank_key, visible_gpu_keys
from ..transport.strings import all_gather_str
from . import sglang_compat as sg
from .drafts import Draft, ModelSet, draft_prefixes
from .weights_state import WeightsState

_state: WeightsState | None = None
_placement: Placement | None = None
_models: ModelSet | None = None


class Placement(msgspec.Struct, frozen=True):
    """Where the server's TP ranks run, published in /model_info so that loaders follow the server (not their
    own machine): the device kind and, per rank, the key a loader must use (``GPU-<uuid>`` / ``cpu-tp<r>``)."""

    device: str
    rank_keys: list[str]  # this replica's ranks: its TP ranks, stage by stage with pipeline stages
    peer_access: bool = False  # every rank reads every other rank's GPU memory peer to peer (one copy per node)
    replica: int | None = None  # the data-parallel replica (--dp N) these ranks make up; None without replicas
    pp_size: int = 1  # pipeline stages (--pp-size N): rank_keys holds each stage's TP ranks in turn


def know_models(owner) -> ModelSet:
    """The models this process writes (the target and its draft models), decided once from the scheduler or its
    weight-updater manager: every hook that SGLang enters with one of them calls this before ``state``."""
    global _models
    if _models is None:
        (target, target_checkpoint), drafts = sg.target_and_drafts(owner)
        _models = ModelSet(
            target,
            tuple(
                Draft(prefix, model, checkpoint, checkpoint == target_checkpoint)
                for prefix, (model, checkpoint) in zip(draft_prefixes(len(drafts)), drafts)
            ),
        )
    return _models


def models(model: torch.nn.Module) -> ModelSet:
    """The set ``model`` belongs to (the target alone where the scheduler has not made its drafts known)."""
    if _models is not None and any(member is model for member in (_models.target, *(d.model for d in _models.drafts))):
        return _models
    return ModelSet(model)


def state(model: torch.nn.Module) -> WeightsState:
    """This rank's state (its target's and draft models' parameters), made on first use: under
    --wait-for-initial-weights nothing is written yet (the random fill is skipped, parameters are uninitialised
    memory); otherwise SGLang loaded every parameter at start."""
    global _state
    if _state is None:
        _state = WeightsState(models(model).required(), complete=not sg.wait_flag_enabled())
    return _state


def weights_complete() -> bool:
    """For the scheduler's generate guard (no model at hand): before any update, complete unless waiting."""
    return _state.complete if _state is not None else not sg.wait_flag_enabled()


def agree(*flags: bool) -> list[bool]:
    """Each flag OR-ed over the replica's ranks (every rank must call this at the same point, with as many flags)."""
    group = sg.model_cpu_group()
    if group is None:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def first_error(key: str, error: str | None) -> str:
    """The error of the first rank that had one (in rank order), named by its key, on every rank: the answer SGLang
    returns comes from one rank, which must say why another rank failed (every rank calls this at the same point,
    after ``agree`` said one failed)."""
    own = f"on {key}: {error}" if error else ""
    group = sg.model_cpu_group()
    texts = [own] if group is None else all_gather_str(own, group, dist.get_world_size(group))
    return next((text for text in texts if text), "a rank failed without saying why (see the server log)")


def own_key(device: torch.device, tp_rank: int) -> str:
    """The key this rank answers to in ``zmq_handles``: its GPU, or on CPU its replica, stage and TP rank."""
    stage, stages = sg.pipeline_stage()
    return device_rank_key(device, tp_rank, sg.replica(), stage if stages > 1 else None)


def placement(device: torch.device, tp_rank: int) -> Placement:
    """Gathered once over the replica's ranks (every rank calls this at the same point: SGLang hands every control
    request, and every update, to all TP ranks; pipeline.py has every stage handle it together)."""
    global _placement
    if _placement is None:
        replica, stages = sg.replica(), sg.pipeline_stage()[1]
        key = own_key(device, tp_rank)
        group = sg.model_cpu_group()
        keys = [key] if group is None else all_gather_str(key, group, dist.get_world_size(group))
        peer_access = False
        if device.type == "cuda" and len(keys) > 1:
            visible = visible_gpu_keys()
            unreadable = [peer_unreadable(key, peer, visible, torch.cuda.can_device_access_peer) for peer in keys]
            peer_access = not agree(any(unreadable))[0]
        _placement = Placement(device.type, keys, peer_access, replica, stages)
    return _placement
