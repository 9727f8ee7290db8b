"""HTTP side of the plugin: the gate middleware and wrappers around SGLang's own routes.

After every route that can change weights (``/update_weights_from_ipc`` / ``_disk`` / ``_distributed`` /
``_tensor``, ``/begin_weight_update``, ``/end_weight_update``) the HTTP process asks the scheduler for its weights
state, as structured data through SGLang's internal-state request, and opens or closes the gate from that alone:
nothing is read out of messages (which carry caller text such as ``weight_version``).

- ``/update_weights_from_ipc``: one update at a time (a second gets 409). With ``zmq_handles[PHASE_KEY] ==
  "stage"`` it goes to the schedulers without SGLang's model-update lock (staging writes no weight); "commit"
  and plain streaming updates take the lock as SGLang's route does.
- ``/begin_weight_update`` … ``/end_weight_update``: generation is held for the whole session (requests in
  flight finish first, new ones wait), so no request runs on a mix of old and new weights.
- ``/model_info``: adds ``weights_loaded`` and a ``ckpt_plugin`` section (the loader checks for it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from fastapi.responses import ORJSONResponse

from .. import __version__
from ..transport.messages import PHASE_KEY
from . import kept_buffers, metrics, replicas
from . import sglang_compat as sg
from .gate import GateState, WeightsGate

logger = logging.getLogger("sglang_ckpt_plugin")

STATE_TIMEOUT_S = 120.0
_update_lock = asyncio.Lock()
_session = {"held": False, "started": None}  # generation held by us for an open trainer session; since when
_wait_for_weights = False


async def refresh_state(started: float | None = None) -> list[dict]:
    """Read the scheduler's weights state and set the gate (and SGLang's own readiness flag) from it.
    ``started``: when the update call that may have recorded an outcome began (for the metrics). Returns the
    replicas' reports (none where a scheduler did not answer)."""
    try:
        states = await asyncio.wait_for(sg.scheduler_internal_states(), STATE_TIMEOUT_S)
    except (asyncio.TimeoutError, RuntimeError) as exc:
        logger.error("the scheduler did not answer for its weights state (%r); closing the gate", exc)
        GateState.open = False
        return []
    reports = [s.get(sg.INTERNAL_STATE_KEY) for s in states if isinstance(s, dict)]
    if not reports or any(r is None for r in reports):
        logger.error("the scheduler did not report its weights state; closing the gate")
        GateState.open = False
        return []
    reports = replicas.by_replica(reports)
    GateState.report = next((r for r in reports if r["state"] != "complete"), reports[0])  # the one that says why
    GateState.placement = replicas.merged_placement(reports)
    _set_gate(reports)
    metrics.observe(GateState.report, GateState.open, started)
    return reports


def _set_gate(reports: list[dict]) -> None:
    GateState.open = all(r["state"] == "complete" for r in reports) and GateState.diverged is None
    sg.set_initial_weights_loaded(GateState.open)


def _replace_endpoint(app, path: str, make_wrapper) -> None:
    """Swap the endpoint of SGLang's route ``path`` for ``make_wrapper(original)``, keeping its place."""
    from fastapi.routing import APIRoute

    routes = app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, APIRoute) and route.path == path:
            app.add_api_route(
                path,
                make_wrapper(route.endpoint),
                methods=sorted(route.methods),
                name=route.name,
                response_class=route.response_class,
                dependencies=route.dependencies,
            )
            routes[i] = routes.pop()
            return
    raise RuntimeError(f"SGLang route {path} not found: this SGLang version is not supported by the plugin")


def _then_refresh(original):
    """Any route that may change weights: run it, then take the scheduler's word for the state. With data-parallel
    replicas, a success of SGLang's route (every replica succeeded) that wrote the whole model on each makes
    replicas that had diverged agree again."""

    @functools.wraps(original)
    async def route(*args, **kwargs):
        started = time.monotonic()
        resp = None
        try:
            resp = await original(*args, **kwargs)
            return resp
        finally:
            reports = await refresh_state(_session["started"] or started)  # inside a trainer session: since its begin
            if resp is not None and _succeeded(resp) and len(reports) > 1:
                _set_divergence([True] * len(reports), reports)

    return route


def _set_divergence(outcomes: list[bool], reports: list[dict], why: str = "") -> None:
    diverged = replicas.divergence(outcomes, reports, GateState.diverged, why)
    if diverged != GateState.diverged and reports:
        if diverged:
            logger.error("closing the gate: %s", diverged)
        else:
            logger.warning("every data-parallel replica holds the same weights again")
        GateState.diverged = diverged
        _set_gate(reports)


def _wrap_update_ipc(original):
    """SGLang's route asserts one data-parallel replica; ours sends the request to every replica (as SGLang's own
    communicator does) and answers for all of them."""

    @functools.wraps(original)
    async def update_weights_from_ipc(*args, **kwargs):
        if _update_lock.locked():
            return ORJSONResponse(
                {"success": False, "message": "another weight update is in progress; retry when it has finished"},
                status_code=409,
            )
        obj = kwargs.get("obj")
        phase = (getattr(obj, "zmq_handles", None) or {}).get(PHASE_KEY)
        async with _update_lock:
            started = time.monotonic()
            if phase in ("stage", "abort"):  # no weight changes: no model-update lock
                resp = await _stage(obj)
                if phase == "abort" or resp.status_code != 200:
                    await refresh_state(started)  # a refused stage or a dropped update counts as an outcome
                return resp
            return await _update(obj, started)

    return update_weights_from_ipc


async def _update(obj, started: float) -> ORJSONResponse:
    """A streaming update or a commit, on every replica; the gate follows what they all recorded."""
    try:
        outcomes = await sg.update_on_schedulers(obj)
    except Exception as exc:  # as SGLang's route: the answer says what failed
        logger.exception("IPC weight update failed")
        outcomes = [(False, f"IPC weight update failed: {exc}")]
    finally:
        reports = await refresh_state(_session["started"] or started)
    success = bool(outcomes) and all(ok for ok, _ in outcomes)
    failed = [message for ok, message in outcomes if not ok]
    _set_divergence([ok for ok, _ in outcomes], reports, "; ".join(failed))
    message = "; ".join(dict.fromkeys(failed)) if failed else " ".join(dict.fromkeys(m for _, m in outcomes))
    if success and obj.weight_version is not None:
        message += f" Weight version updated to {obj.weight_version}."
    return ORJSONResponse({"success": success, "message": message}, status_code=200 if success else 400)


async def _stage(obj) -> ORJSONResponse:
    """Hand a stage (or abort) request to every scheduler without SGLang's model-update lock: generation goes on,
    as neither writes a weight. A stage is answered as soon as each rank's background receiver started."""
    obj.flush_cache, obj.weight_version = False, None  # nothing is served from staged bytes: no flush, no version
    success, message = await sg.stage_on_schedulers(obj)
    return ORJSONResponse({"success": success, "message": message}, status_code=200 if success else 400)


def _wrap_begin_session(original):
    @functools.wraps(original)
    async def begin_weight_update(*args, **kwargs):
        started = time.monotonic()
        held = await sg.hold_generation()  # in-flight requests finish first; new ones wait for the session's end
        try:
            resp = await original(*args, **kwargs)
        except BaseException:
            if held:
                await sg.release_generation()
            raise
        if _succeeded(resp):
            _session["held"] = _session["held"] or held
            _session["started"] = _session["started"] or started
        elif held:
            await sg.release_generation()
        await refresh_state(started)
        return resp

    return begin_weight_update


def _wrap_end_session(original):
    @functools.wraps(original)
    async def end_weight_update(*args, **kwargs):
        started = _session["started"] or time.monotonic()
        try:
            return await original(*args, **kwargs)
        finally:
            await refresh_state(started)  # before releasing: held requests then meet the gate's final answer
            if not (GateState.report or {}).get("session_open"):
                _session["started"] = None
                if _session["held"]:
                    _session["held"] = False
                    await sg.release_generation()

    return end_weight_update


def _succeeded(resp) -> bool:
    try:
        return getattr(resp, "status_code", 200) == 200 and bool(json.loads(bytes(resp.body)).get("success"))
    except (AttributeError, ValueError):
        return False


def _wrap_model_info(original):
    @functools.wraps(original)
    async def model_info(*args, **kwargs):
        result = await original(*args, **kwargs)
        if not _update_lock.locked():
            await refresh_state()  # fresh: a staged update moves on in the background (a running update would block it)
        report = GateState.report or {}
        placement = GateState.placement or {}
        result["weights_loaded"] = GateState.open
        result["ckpt_plugin"] = {
            "version": __version__,
            "weights_loaded": GateState.open,
            "wait_for_initial_weights": _wait_for_weights,
            **sg.parallel_sizes(),  # tp_size, dp_size (replicas), pp_size, attn_dp_size
            "device": placement.get("device"),  # "cuda" / "cpu": loaders follow the server, not their own machine
            "rank_keys": placement.get("rank_keys", []),  # every rank, replica by replica: GPU-<uuid> / cpu-tp<r>
            "ranks": placement.get("ranks", []),  # each key with its replica and TP rank
            "peer_access": placement.get("peer_access", False),  # one loader process may feed every GPU of the node
            "keeps_update_buffers": kept_buffers.enabled(),  # --keep-update-buffers: loaders borrow, not allocate
            "weights_state": "incomplete" if GateState.diverged else report.get("state", _default_state()),
            "replicas_diverged": GateState.diverged,
            "missing": report.get("missing", []),
            "missing_count": report.get("missing_count", 0),
            "update_in_progress": _update_lock.locked(),
            "session_open": report.get("session_open", False),
            "fingerprint": report.get("fingerprint"),
            "last_update": report.get("last_update"),
            "staging": report.get("staging"),  # this server's latest staged update (TP rank 0's view)
        }
        return result

    return model_info


def _default_state() -> str:
    return "complete" if GateState.open else "waiting"


def install(app, wait_for_weights: bool) -> None:
    """Called once in the HTTP server process, before the app starts."""
    global _wait_for_weights
    _wait_for_weights = wait_for_weights
    GateState.open = not wait_for_weights
    _replace_endpoint(app, "/update_weights_from_ipc", _wrap_update_ipc)
    _replace_endpoint(app, "/model_info", _wrap_model_info)
    for path in ("/update_weights_from_disk", "/update_weights_from_distributed", "/update_weights_from_tensor"):
        _replace_endpoint(app, path, _then_refresh)
    _replace_endpoint(app, "/begin_weight_update", _wrap_begin_session)
    _replace_endpoint(app, "/end_weight_update", _wrap_end_session)
    app.add_middleware(WeightsGate)
