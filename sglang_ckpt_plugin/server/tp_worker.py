"""TP-worker side: SGLang's model-runner ``update_weights_from_ipc``, served by our receiver.

SGLang's scheduler calls this for each model runner with the ``UpdateWeightsFromIPCReqInput``; on
success it records the weight version, flushes the cache and barriers the TP group itself.
"""

from __future__ import annotations

import logging
import os

from ..transport.handles import device_rank_key
from . import sglang_compat as sg
from .receiver import ReceiveSession
from .validate import validate_update

logger = logging.getLogger("sglang_ckpt_plugin")

IDLE_TIMEOUT_ENV = "SGLANG_CKPT_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT_S = 120.0
# In a failed update's message: the served weights were partly overwritten (read by routes.py).
INCOMPLETE_MARKER = "[weights incomplete]"

# Per scheduler process: False after an update failed part-way, until a complete update succeeds.
_weights_complete = True


def weights_complete() -> bool:
    return _weights_complete


def mark_weights_complete() -> None:
    global _weights_complete
    _weights_complete = True


def mark_weights_incomplete() -> None:
    global _weights_complete
    _weights_complete = False


INCOMPLETE_REFUSAL = (
    "the last weight update failed part-way, so this server holds partly-updated weights and refuses to "
    "generate until a complete update is pushed (python -m sglang_ckpt_plugin.update ...)"
)


def idle_timeout_s() -> float:
    return float(os.environ.get(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_TIMEOUT_S))


def update_weights_from_ipc(updater, recv_req) -> tuple[bool, str]:
    """Receive one update for this rank. Returns SGLang's (success, message)."""
    device = sg.runner_device(updater)
    key = device_rank_key(device, sg.runner_rank(updater))
    handles = recv_req.zmq_handles or {}
    model = updater.get_model()
    session = None
    ok, error = True, ""
    try:
        refusal = sg.check_online_update_allowed(updater)
        if refusal:
            raise RuntimeError(refusal)
        if key not in handles:
            raise RuntimeError(f"no endpoint for this rank ({key}) in zmq_handles (keys: {sorted(handles)[:8]}); "
                               "is --inference-parallel-size the server's --tp?")  # fmt: skip
        with sg.model_dtype_context(updater):
            session = ReceiveSession(
                endpoint=handles[key],
                device=device,
                load_weights=model.load_weights,
                post_process=lambda: sg.post_process_model(model, device),
                idle_timeout_s=idle_timeout_s(),
                prepare=lambda: sg.prepare_model_for_loading(model, device),
                validate=lambda manifest, partial, allow_unused: validate_update(model, manifest, partial, allow_unused),
            )
            stats = session.run()
    except Exception as exc:  # never let a bad update take the scheduler down
        logger.error("weight update on %s failed: %s", key, exc)
        ok, error = False, str(exc)
    touched = session is not None and session.touched_weights
    # TP ranks must agree: a model half-updated on one rank is half-updated everywhere, and every rank's
    # generate guard must give the same answer (the scheduler broadcasts each request to all ranks).
    all_ok, any_touched = _agree(ok, touched)
    global _weights_complete
    if all_ok:
        _weights_complete = True
    elif any_touched:
        _weights_complete = False  # otherwise the weights served before this update are intact
    if not all_ok:
        why = error or "another tensor-parallel rank failed (see its log line)"
        if any_touched:
            return False, f"{INCOMPLETE_MARKER} weight update on {key} failed part-way: {why}"
        return False, f"weight update on {key} failed before any weight was changed: {why}"
    logger.info(
        "rank %s loaded %d tensors (%.3f GB) in %d buckets: load %.3f s, post-process %.3f s",
        key, stats.tensors, stats.bytes / 1e9, stats.buckets, stats.load_s, stats.post_s,
    )  # fmt: skip
    message = f"loaded {stats.tensors} tensors ({stats.bytes} bytes) in {stats.buckets} buckets"
    if stats.fingerprint:
        message += f", verified, fingerprint={stats.fingerprint}"
    return True, message


def _agree(ok: bool, touched: bool) -> tuple[bool, bool]:
    """(every TP rank succeeded, some TP rank changed weights), over the TP group's gloo group."""
    group = sg.tp_cpu_group()
    if group is None:
        return ok, touched
    import torch
    import torch.distributed as dist

    flags = torch.tensor([0 if ok else 1, 1 if touched else 0], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags[0].item() == 0, flags[1].item() == 1
