"""SGLang's own trainer path (``/update_weights_from_distributed`` inside ``/begin_weight_update`` …
``/end_weight_update``), seen by the plugin in the scheduler process.

- Every received bucket is dry-run against the model before it is loaded (unknown names and wrong shapes are
  refused with nothing written), as for our own pushes.
- The names a session loaded are remembered; when the session ends having covered every parameter, the end
  reply carries COMPLETE_MARKER and the HTTP side opens the readiness gate (``--wait-for-initial-weights``).
- A bucket that fails while loading leaves partly-new weights: generation is refused until a complete update.
"""

from __future__ import annotations

import logging

import torch

from . import tp_worker
from .validate import validate_update

logger = logging.getLogger("sglang_ckpt_plugin")

COMPLETE_MARKER = "[weights complete]"

_loaded: dict[str, tuple[str, list[int]]] = {}  # name -> (dtype, shape) loaded in the open session
_model: torch.nn.Module | None = None


def _manifest(items) -> list[tuple[str, str, list[int]]]:
    return [(name, dtype, shape) for name, (dtype, shape) in items]


def load_weights_from_distributed(original, updater, named_tensors):
    """AROUND the model runner's loader of received tensors; returns SGLang's (success, message)."""
    global _model
    _model = updater.get_model()
    entries = {name: (str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in named_tensors}
    try:
        validate_update(_model, _manifest(entries.items()), partial=True)
    except ValueError as exc:
        return False, f"update rejected before any weight was changed: {exc}"
    ok, message = original(updater, named_tensors)
    if ok:
        _loaded.update(entries)
    else:
        tp_worker.mark_weights_incomplete()
        message = f"{tp_worker.INCOMPLETE_MARKER} {message}"
    return ok, message


def session_covered_every_parameter() -> bool:
    """At the end of a session: did its buckets reach every parameter? Forgets the session either way."""
    try:
        if not _loaded or _model is None:
            return False
        validate_update(_model, _manifest(_loaded.items()), partial=False)
        return True
    except ValueError as exc:
        logger.info("trainer session did not cover the whole model: %s", exc)
        return False
    finally:
        _loaded.clear()
