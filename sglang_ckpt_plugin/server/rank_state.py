"""Per scheduler (TP-rank) process: the weights state of this rank, and the one way TP ranks agree.

Every update path ends with ``agree(...)`` over SGLang's gloo TP group before it records an outcome, so every
rank records the same outcome and every rank's generate guard gives the same answer (the scheduler broadcasts
each request to all ranks).
"""

from __future__ import annotations

import torch

from . import sglang_compat as sg
from .validate import required_coverage
from .weights_state import WeightsState

_state: WeightsState | None = None


def state(model: torch.nn.Module) -> WeightsState:
    """This rank's state, made on first use: under --wait-for-initial-weights nothing is written yet (the random
    fill is skipped, parameters are uninitialised memory); otherwise SGLang loaded every parameter at start."""
    global _state
    if _state is None:
        _state = WeightsState(required_coverage(model), complete=not sg.wait_flag_enabled())
    return _state


def weights_complete() -> bool:
    """For the scheduler's generate guard (no model at hand): before any update, complete unless waiting."""
    return _state.complete if _state is not None else not sg.wait_flag_enabled()


def agree(*flags: bool) -> list[bool]:
    """Each flag OR-ed over the TP ranks (every rank must call this at the same point, with as many flags)."""
    group = sg.tp_cpu_group()
    if group is None:
        return list(flags)
    import torch.distributed as dist

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]
