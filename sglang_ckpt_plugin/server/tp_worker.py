"""TP-worker side: SGLang's model-runner ``update_weights_from_ipc``, served by our receiver.

SGLang's scheduler calls this for each model runner with the ``UpdateWeightsFromIPCReqInput``; on
success it records the weight version, flushes the cache and barriers the TP group itself. The outcome is
agreed across TP ranks and recorded in this rank's weights state (rank_state.py); the (success, message)
returned to SGLang is for people only.
"""

from __future__ import annotations

import functools
import logging
import os

from ..transport.messages import PHASE_KEY, PHASES
from . import foreign, kept_buffers, rank_state, staging
from . import sglang_compat as sg
from .postprocessed import ModelLoad
from .receiver import ReceiveSession, UpdateFailed, UpdateRefused
from .writer import exclusive

logger = logging.getLogger("sglang_ckpt_plugin")

IDLE_TIMEOUT_ENV = "SGLANG_CKPT_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT_S = 120.0

DRAFT_WRITTEN_WITH_TARGET = "the draft model(s) took their part of the same update, in the same call"

INCOMPLETE_REFUSAL = (
    "the served weights are incomplete (never fully loaded, or an update failed part-way), so this server "
    "refuses to generate until a complete update is pushed (python -m sglang_ckpt_plugin.update ...)"
)


def idle_timeout_s() -> float:
    return float(os.environ.get(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_TIMEOUT_S))


def rank_key(updater, device) -> str:
    """The key of the rank this runner serves (rank_state.own_key)."""
    return rank_state.own_key(device, sg.runner_rank(updater))


_target_message = ""  # the answer of this process's last target call, which its draft models' calls repeat


def update_weights_from_ipc(updater, recv_req) -> tuple[bool, str]:
    """Receive one update for this rank (streaming), stage one, or commit a staged one (``PHASE_KEY`` in
    ``zmq_handles``). Returns SGLang's (success, message). SGLang asks each draft model's runner next, and only
    after the target's call succeeded: that call wrote the draft too (drafts.py), so the draft's repeats its answer."""
    global _target_message
    if sg.is_draft_runner(updater):
        return True, f"{_target_message}; {DRAFT_WRITTEN_WITH_TARGET}"
    ok, _target_message = _update_target(updater, recv_req)
    return ok, _target_message


def _update_target(updater, recv_req) -> tuple[bool, str]:
    handles = dict(recv_req.zmq_handles or {})
    phase = handles.pop(PHASE_KEY, None)
    if phase == "stage":
        return _stage(updater, handles)
    if phase == "abort":
        return _abort(updater, handles)
    device = sg.runner_device(updater)
    key = rank_key(updater, device)
    model = updater.get_model()
    weights = rank_state.state(model)
    session, stats = None, None
    ok, refused, error = True, False, ""
    held = None  # a retried commit this rank committed already (another rank, stage or replica failed it)
    if phase == "commit":
        held = staging.holds_committed(handles.get(key), weights.writes)
        (any_not_held,) = rank_state.agree(held is None)
        if not any_not_held:  # every rank of this replica holds it: another replica failed
            return True, f"update {handles[key]} is committed on {key} already; nothing written since"
    try:
        _check_request(updater, key, handles, phase)
        with sg.model_dtype_context(updater), exclusive():  # the one writer of the model for the whole update
            if held is not None:  # this rank committed it, another did not: only the others load it again
                staged, stats = held, held.stats
                session = staged.session
            elif phase == "commit":
                staged, stats = staging.commit(handles[key])
                session = staged.session
            else:
                session = _session(updater, model, device, handles[key], staging=False)
                stats = session.run()
    except Exception as exc:  # never let a bad update take the scheduler down
        logger.error("weight update on %s failed: %s", key, exc)
        ok, refused, error = False, isinstance(exc, UpdateRefused), str(exc)
        if phase == "commit" and isinstance(exc, UpdateFailed) and not refused:
            session = staging.session_of(handles.get(key))
    touched = session is not None and session.touched_weights
    coverage = session.coverage if session is not None else None
    # TP ranks agree: a model half-updated on one rank is half-updated everywhere; a coverage one rank does not
    # know (it failed before the manifest) makes every rank assume the worst.
    any_failed, any_touched, any_unknown, any_refused = rank_state.agree(not ok, touched, coverage is None, refused)
    if any_failed:
        why = rank_state.first_error(key, error)
        if any_touched:
            weights.failed_partway(None if any_unknown else coverage, "ipc", why)
            if phase == "commit" and ok:  # this rank's commit landed: a retry finds it held and loads nothing here
                staging.mark_committed(staged, weights.writes)
            retry = " (the staged bytes are kept: commit again to retry)" if phase == "commit" else ""
            return False, f"weight update on {key} failed part-way (the weights are now incomplete){retry}: {why}"
        if any_refused:
            weights.rejected("ipc", why)
        else:
            weights.failed_untouched("ipc", why)
        return False, f"weight update on {key} failed before any weight was changed: {why}"
    weights.succeeded(
        coverage,
        "ipc",
        f"loaded {stats.tensors} tensors in {stats.buckets} buckets",
        tensors=stats.tensors,
        nbytes=stats.bytes,
        fingerprint=stats.fingerprint,
    )
    if phase == "commit":
        staging.mark_committed(staged, weights.writes)
    if held is not None:
        logger.info(
            "rank %s held update %s committed already; the ranks that had failed it loaded it", key, handles[key]
        )
        return True, f"update {handles[key]} is committed on {key} already; the other ranks loaded it again"
    logger.info(
        "rank %s loaded %d tensors (%.3f GB) in %d buckets%s: load %.3f s, post-process %.3f s",
        key,
        stats.tensors,
        stats.bytes / 1e9,
        stats.buckets,
        " (staged)" if phase == "commit" else "",
        stats.load_s,
        stats.post_s,
    )
    return True, f"loaded {stats.tensors} tensors ({stats.bytes} bytes) in {stats.buckets} buckets"


def _check_request(updater, key: str, handles: dict, phase: str | None) -> None:
    """Refusals that need no loader: raise UpdateRefused."""
    if phase not in (None, *PHASES):
        raise UpdateRefused(f"unknown update phase {phase!r} in zmq_handles[{PHASE_KEY!r}] (expected one of {PHASES})")
    refusal = sg.check_online_update_allowed(updater)
    if refusal:
        raise UpdateRefused(refusal)
    if key not in handles:
        raise UpdateRefused(
            f"no endpoint for this rank ({key}) in zmq_handles (keys: {sorted(handles)[:8]}); "
            "is --inference-parallel-size the server's --tp (times its --pp-size and --dp)?"
        )
    if phase is None and foreign.answer_checkpoint_engine(handles[key]):  # SGLang's documented pusher, not ours
        raise UpdateRefused(foreign.CHECKPOINT_ENGINE_REFUSAL)


def _session(updater, model, device, endpoint: str, staging: bool) -> ReceiveSession:
    """One receive session writes the target and its draft models (drafts.py); each member's post-processed
    modules are restored before the first write and post-processed after the last (postprocessed.py)."""
    models = rank_state.models(model)
    loads: list[ModelLoad] = []

    def prepare() -> None:
        coverage = session.coverage or {}
        loads[:] = [
            ModelLoad(m, device, models.own_coverage(m, coverage), session.writes, models.prefix_of(m))
            for m in models.written_by(coverage)
        ]
        for load in loads:
            load.prepare()

    def load_weights(views) -> None:
        names = [name for name, _ in views]
        call = functools.partial(models.load_weights, views)
        for load in loads:  # each member restores before the bucket and post-processes what it completes after it
            call = functools.partial(load.load, names, call)
        call()

    def post_process() -> None:
        for load in loads:
            load.post_process()

    def abandon() -> None:
        for load in loads:
            load.abandon()

    session = ReceiveSession(
        endpoint=endpoint,
        device=device,
        load_weights=load_weights,
        post_process=post_process,
        idle_timeout_s=idle_timeout_s(),
        validate=models.check,
        prepare=prepare,
        staging=staging,
        abandon=abandon,
        kept=kept_buffers.kept_buffers(),
    )
    return session


def _stage(updater, handles: dict) -> tuple[bool, str]:
    """Start receiving a staged update in the background and answer at once (the loader hears of the outcome of
    each bucket over its channel). The weights state does not change: nothing is written until the commit."""
    device = sg.runner_device(updater)
    key = rank_key(updater, device)
    error = None
    try:
        _check_request(updater, key, handles, "stage")
        session = _session(updater, updater.get_model(), device, handles[key], staging=True)
    except Exception as exc:
        error = str(exc)
    (any_refused,) = rank_state.agree(error is not None)  # every rank stages, or none does
    if any_refused:
        why = rank_state.first_error(key, error)
        logger.error("staging on %s refused: %s", key, why)
        rank_state.state(updater.get_model()).rejected("ipc", why)
        return False, f"staging on {key} refused: {why}"
    staging.start(session)
    return True, f"staging on {key}"


def _abort(updater, handles: dict) -> tuple[bool, str]:
    """The loader called a staged update off (a rank or an instance failed): drop what this rank staged and
    record why, as the streaming path records a refused or failed update. The served weights were never touched."""
    key = rank_key(updater, sg.runner_device(updater))
    staged = staging.abort(handles.get(key, ""))
    # nothing to record where nothing of it is held (committed, or never staged) or a failed commit was recorded
    record = staged is not None and not staged.commit_failed
    error = staged.error if record and staged.error else None
    any_record, any_error, any_refused = rank_state.agree(record, error is not None, record and staged.refused)
    if not any_record:
        return True, f"nothing staged to drop on {key}"
    why = error or (
        "another tensor-parallel rank failed to stage (see its log line)"
        if any_error
        else "another loader rank or instance failed before the commit; nothing was changed"
    )
    weights = rank_state.state(updater.get_model())
    if any_refused:
        weights.rejected("ipc", why)
    else:
        weights.failed_untouched("ipc", why)
    return True, f"staged update dropped on {key}: {why}"
