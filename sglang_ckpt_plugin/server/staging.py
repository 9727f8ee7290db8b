"""Staged updates in one scheduler (TP-rank) process: received and checked in the background, loaded on commit.

Stage (``zmq_handles[PHASE_KEY] == "stage"``): the scheduler starts a ``ReceiveSession`` in stage mode on a thread
and answers at once; the thread maps the loader's buffers (or checkpoint files), checks the manifest against the
model, every bucket's bounds and (``--verify``) digests, and keeps it all mapped. The served weights are never
touched and SGLang's model-update lock is never taken, so the server keeps serving while the bytes arrive.

Commit (``"commit"``): under SGLang's lock, the staged buckets are loaded into the model and post-processed; the
pause a client sees is this alone. A commit that fails keeps the staged bytes, so it can be retried without the
loader reading anything again; one that succeeds releases them. A staged update that nobody commits is released
after ``SGLANG_CKPT_STAGED_TIMEOUT`` seconds; a new stage replaces an older one that is not being committed.
One staged update per process at a time (one scheduler process serves one TP rank).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Literal

import msgspec
import torch

from .receiver import ReceiveSession, ReceiveStats, UpdateFailed, UpdateRefused

logger = logging.getLogger("sglang_ckpt_plugin")

STAGED_TIMEOUT_ENV = "SGLANG_CKPT_STAGED_TIMEOUT"
DEFAULT_STAGED_TIMEOUT_S = 600.0
SETTLE_S = 10.0  # a commit or abort that finds its update still "staging" waits this long for the thread's end
StageState = Literal["staging", "staged", "failed", "committing", "committed", "released"]


class StagingReport(msgspec.Struct, frozen=True):
    """This rank's latest staged update, for /model_info (``ckpt_plugin.staging``)."""

    update_id: str | None
    state: StageState
    error: str | None
    bytes: int
    staged_at: float | None  # time.time() when every bucket had arrived and was checked
    committed_at: float | None  # when the commit finished loading (time.time())


def staged_timeout_s() -> float:
    return float(os.environ.get(STAGED_TIMEOUT_ENV, DEFAULT_STAGED_TIMEOUT_S))


class StagedUpdate:
    def __init__(self, session: ReceiveSession):
        self.session = session
        self.state: StageState = "staging"
        self.error: str | None = None
        self.staged_at: float | None = None
        self.committed_at: float | None = None
        self.bytes = 0  # payload staged (once every bucket arrived)
        self.refused = False  # failed because the update does not fit the model (nothing was ever written)
        self.commit_failed = False  # a commit was tried and failed (its outcome is recorded already)
        self.writes_after: int | None = None  # the rank's count of weight writes right after its commit
        self.stats: ReceiveStats | None = None  # what its commit loaded
        self._timer: threading.Timer | None = None
        self.thread = threading.Thread(target=self._receive, name="ckpt-stage", daemon=True)

    @property
    def update_id(self) -> str | None:
        return self.session.update_id

    def report(self) -> StagingReport:
        return StagingReport(self.update_id, self.state, self.error, self.bytes, self.staged_at, self.committed_at)

    def _receive(self) -> None:
        device = getattr(self.session, "device", None)
        if device is not None and device.type == "cuda":  # else this thread's current device is 0 on every rank:
            torch.cuda.set_device(device)  # the dry run's model code would make a context on GPU 0
        try:
            self.session.run()
        except Exception as exc:  # UpdateFailed, or anything unexpected: never kept half-received
            with _lock:
                self.state, self.error = "failed", str(exc)
                self.refused = isinstance(exc, UpdateRefused)
            logger.error("staging update %s failed (the served weights are unchanged): %s", self.update_id, exc)
            return
        with _lock:
            if self.state != "staging":  # replaced while receiving
                self.session.release()
                return
            self.state, self.staged_at = "staged", self.session.staged_at or time.time()
            self.bytes = self.session.staged_bytes()
            self._arm_timer()
        logger.info(
            "staged update %s: %d buckets checked, waiting for its commit", self.update_id, len(self.session.staged)
        )

    def _arm_timer(self) -> None:
        self._timer = threading.Timer(staged_timeout_s(), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with _lock:
            if self.state != "staged":
                return
            self._release_locked(f"not committed within {staged_timeout_s():g} s ({STAGED_TIMEOUT_ENV})")
        logger.warning("staged update %s released: never committed", self.update_id)

    def _release_locked(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.session.release()
        self.state, self.error = "released", why


_lock = threading.Lock()
_current: StagedUpdate | None = None


def _settle(update_id: str) -> None:
    """Wait (at most SETTLE_S) for the receiving thread of ``update_id`` to record how staging ended."""
    with _lock:
        staged = _current
    if staged is not None and staged.update_id == update_id and staged.state == "staging":
        staged.thread.join(timeout=SETTLE_S)


def start(session: ReceiveSession) -> None:
    """Begin staging in the background (returns at once); an older staged update is released first."""
    global _current
    with _lock:
        old = _current  # never "committing" here: stage and commit both run on the scheduler's thread
        if old is not None and old.state in ("staging", "staged"):
            logger.warning("staged update %s replaced by a new stage before its commit", old.update_id)
            if old.state == "staged":
                old._release_locked("replaced by a newer staged update")
            else:
                old.state, old.error = "released", "replaced by a newer staged update"  # its thread releases it
        _current = StagedUpdate(session)
        _current.thread.start()


def commit(update_id: str) -> tuple[StagedUpdate, ReceiveStats]:
    """Load the staged update ``update_id`` into the model (the caller holds SGLang's lock). UpdateRefused when there
    is nothing to commit (the weights are untouched); UpdateFailed when loading failed (staged bytes kept)."""
    _settle(update_id)  # the loader had its last reply: the receiving thread is about to mark it staged
    with _lock:
        staged = _current
        if staged is None or staged.update_id != update_id:
            have = "nothing" if staged is None else f"update {staged.update_id} ({staged.state})"
            raise UpdateRefused(f"nothing staged under update {update_id} on this rank (it holds {have}); stage again")
        if staged.state != "staged":
            why = f": {staged.error}" if staged.error else ""
            raise UpdateRefused(f"update {update_id} is {staged.state} on this rank, not staged{why}")
        staged.state = "committing"
        if staged._timer is not None:
            staged._timer.cancel()
    try:
        stats = staged.session.commit()
    except Exception as exc:
        with _lock:
            staged.state, staged.error = "staged", f"commit failed: {exc}"  # retry from the same bytes
            staged.commit_failed = True
            staged._arm_timer()
        if isinstance(exc, UpdateFailed):
            raise
        raise UpdateFailed(f"commit failed: {type(exc).__name__}: {exc}") from exc
    with _lock:
        staged.committed_at, staged.stats = time.time(), stats
        staged._release_locked("committed")
        staged.state, staged.error = "committed", None
    return staged, stats


def mark_committed(staged: StagedUpdate, writes: int) -> None:
    """After the commit was recorded: ``writes`` is the rank's count of weight writes, this commit's included."""
    with _lock:
        staged.writes_after = writes


def holds_committed(update_id: str, writes: int) -> StagedUpdate | None:
    """The staged update ``update_id`` if this rank committed it and nothing has written its weights since (else
    None): a commit of it again (a loader retrying a commit that failed on another rank, stage or data-parallel
    replica) has nothing to load here."""
    with _lock:
        staged = _current
        held = (
            staged is not None
            and staged.update_id == update_id
            and staged.state == "committed"
            and staged.writes_after == writes
        )
        return staged if held else None


def abort(update_id: str) -> StagedUpdate | None:
    """The loader called the update off: release what ``update_id`` staged (or is staging) now. Returns it (its
    ``error`` says why it failed here, if it did), or None when this rank holds nothing of it."""
    _settle(update_id)  # the loader aborts after an error reply or its own Abort message: the thread ends at once
    with _lock:
        staged = _current
        if staged is None or staged.update_id != update_id or staged.state == "committed":
            return None
        if staged.state == "staging":
            staged.state = "released"  # its thread releases the buffers when the loader's channel ends
            staged.error = staged.error or "aborted by the loader"
        elif staged.state in ("staged", "failed"):
            error = staged.error
            staged._release_locked(error or "aborted by the loader")
        return staged


def report() -> StagingReport | None:
    with _lock:
        current = _current
    if current is not None and current.state == "staging" and current.session.staged_at is not None:
        current.thread.join(timeout=SETTLE_S)  # it answered the loader's finish: it is recording "staged" now
    with _lock:
        return None if _current is None else _current.report()


def session_of(update_id: str | None) -> ReceiveSession | None:
    """The session of the current staged update if it is ``update_id`` (after a failed commit: what it touched)."""
    with _lock:
        return _current.session if _current is not None and _current.update_id == update_id else None
