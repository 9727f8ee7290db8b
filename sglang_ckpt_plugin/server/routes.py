"""HTTP side of the plugin: the gate middleware and wrappers around SGLang's own routes.

- ``/update_weights_from_ipc``: one update at a time (a second gets 409), result recorded, gate opened on
  success. The work itself is done by the TP workers (tp_worker.py).
- ``/update_weights_from_disk``: a successful full reload also counts as the initial weights.
- ``/update_weights_from_distributed`` / ``_tensor`` and ``/end_weight_update`` (SGLang's trainer path): the
  served weights changed (fingerprint cleared, result recorded); a session that covered every parameter opens
  the gate, one that failed part-way closes it.
- ``/model_info``: adds ``weights_loaded`` and a ``ckpt_plugin`` section (the loader checks for it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time

from fastapi.responses import ORJSONResponse

from .. import __version__
from . import sglang_compat as sg
from .gate import GateState, WeightsGate
from .tp_worker import INCOMPLETE_MARKER
from .trainer_updates import COMPLETE_MARKER

_update_lock = asyncio.Lock()
_last_update: dict | None = None
_fingerprint: str | None = None  # of the weights served now, when the update that loaded them was verified
_FINGERPRINT = re.compile(r"fingerprint=([0-9a-f]{16})")


def _response_payload(resp) -> dict:
    try:
        return json.loads(bytes(resp.body))
    except (AttributeError, ValueError):
        return {}


def _update_record(payload: dict, source: str, fingerprint: str | None, started: float) -> dict:
    """What /model_info reports as ``last_update``."""
    return {"success": bool(payload.get("success")), "message": payload.get("message", ""), "source": source,
            "weight_version": sg.weight_version(), "fingerprint": fingerprint, "started_at": started,
            "duration_s": round(time.time() - started, 4)}  # fmt: skip


def _replace_endpoint(app, path: str, make_wrapper) -> None:
    """Swap the endpoint of SGLang's route ``path`` for ``make_wrapper(original)``, keeping its place."""
    from fastapi.routing import APIRoute

    routes = app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, APIRoute) and route.path == path:
            app.add_api_route(path, make_wrapper(route.endpoint), methods=sorted(route.methods), name=route.name,
                              response_class=route.response_class, dependencies=route.dependencies)  # fmt: skip
            routes[i] = routes.pop()
            return
    raise RuntimeError(f"SGLang route {path} not found: this SGLang version is not supported by the plugin")


def _wrap_update_ipc(original):
    @functools.wraps(original)
    async def update_weights_from_ipc(*args, **kwargs):
        global _last_update, _fingerprint
        if _update_lock.locked():
            return ORJSONResponse(
                {"success": False, "message": "another weight update is in progress; retry when it has finished"},
                status_code=409,
            )
        async with _update_lock:
            started = time.time()
            resp = await original(*args, **kwargs)
            payload = _response_payload(resp)
            found = _FINGERPRINT.search(payload.get("message", ""))
            if payload.get("success"):
                GateState.incomplete_reason = None
                _fingerprint = found.group(1) if found else None
                sg.mark_weights_loaded()
            elif INCOMPLETE_MARKER in payload.get("message", ""):
                # partly-new weights must not be served: close the gate until a complete update arrives
                GateState.incomplete_reason = payload["message"]
                sg.mark_weights_loaded(False)
            _last_update = _update_record(payload, "update_weights_from_ipc", found.group(1) if found else None, started)
            return resp

    return update_weights_from_ipc


def _wrap_update_disk(original):
    @functools.wraps(original)
    async def update_weights_from_disk(*args, **kwargs):
        resp = await original(*args, **kwargs)
        global _fingerprint
        if getattr(resp, "status_code", 200) == 200 and _response_payload(resp).get("success"):
            GateState.incomplete_reason = None
            _fingerprint = None
            sg.mark_weights_loaded()
        return resp

    return update_weights_from_disk


def _wrap_trainer_route(original):
    @functools.wraps(original)
    async def trainer_route(*args, **kwargs):
        global _last_update, _fingerprint
        started = time.time()
        resp = await original(*args, **kwargs)
        payload = _response_payload(resp)
        message = payload.get("message", "")
        if COMPLETE_MARKER in message:
            GateState.incomplete_reason = None
            sg.mark_weights_loaded()
        elif INCOMPLETE_MARKER in message:
            GateState.incomplete_reason = message
            sg.mark_weights_loaded(False)
        if original.__name__ != "end_weight_update":
            _fingerprint = None  # the weights served now are not the verified checkpoint any more
            _last_update = _update_record(payload, original.__name__, None, started)
        return resp

    return trainer_route


def _wrap_model_info(original):
    @functools.wraps(original)
    async def model_info(*args, **kwargs):
        result = await original(*args, **kwargs)
        loaded = sg.weights_loaded()
        result["weights_loaded"] = loaded
        result["ckpt_plugin"] = {
            "version": __version__,
            "weights_loaded": loaded,
            "wait_for_initial_weights": sg.wait_flag_enabled(),
            "tp_size": sg.tp_size(),
            "weights_state": "complete" if loaded else ("incomplete" if GateState.incomplete_reason else "waiting"),
            "update_in_progress": _update_lock.locked(),
            "fingerprint": _fingerprint,
            "last_update": _last_update,
        }
        return result

    return model_info


def install(app) -> None:
    """Called once in the HTTP server process, before the app starts."""
    _replace_endpoint(app, "/update_weights_from_ipc", _wrap_update_ipc)
    _replace_endpoint(app, "/update_weights_from_disk", _wrap_update_disk)
    _replace_endpoint(app, "/model_info", _wrap_model_info)
    for path in ("/update_weights_from_distributed", "/update_weights_from_tensor", "/end_weight_update"):
        _replace_endpoint(app, path, _wrap_trainer_route)
    app.add_middleware(WeightsGate)
