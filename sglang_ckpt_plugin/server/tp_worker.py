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


INCOMPLETE_REFUSAL = (
    "the last weight update failed part-way, so this server holds partly-updated weights and refuses to "
    "generate until a complete update is pushed (python -m sglang_ckpt_plugin.update ...)"
)


def idle_timeout_s() -> float:
    return float(os.environ.get(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_TIMEOUT_S))


def update_weights_from_ipc(updater, recv_req) -> tuple[bool, str]:
    """Receive one update for this rank. Returns SGLang's (success, message)."""
    refusal = sg.check_online_update_allowed(updater)
    if refusal:
        return False, refusal
    device = sg.runner_device(updater)
    key = device_rank_key(device, sg.runner_rank(updater))
    handles = recv_req.zmq_handles or {}
    if key not in handles:
        return False, f"no endpoint for this rank ({key}) in zmq_handles (keys: {sorted(handles)[:8]})"
    global _weights_complete
    model = updater.get_model()
    session = None
    try:
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
        if session is not None and session.touched_weights:
            _weights_complete = False
            return False, f"{INCOMPLETE_MARKER} weight update on {key} failed part-way: {exc}"
        return False, f"weight update on {key} failed before any weight was changed: {exc}"
    _weights_complete = True
    logger.info(
        "rank %s loaded %d tensors (%.3f GB) in %d buckets: load %.3f s, post-process %.3f s",
        key, stats.tensors, stats.bytes / 1e9, stats.buckets, stats.load_s, stats.post_s,
    )  # fmt: skip
    message = f"loaded {stats.tensors} tensors ({stats.bytes} bytes) in {stats.buckets} buckets"
    if stats.fingerprint:
        message += f", verified, fingerprint={stats.fingerprint}"
    return True, message
