"""The one source of truth for "are the served weights complete?", kept in every scheduler (TP) process.

Every update path (our IPC push, SGLang's trainer session and tensor path, disk reload) reports here what it
wrote, after the TP ranks agreed on its outcome, so every rank holds the same state. The HTTP process reads it
as structured data (``WeightsReport``, through SGLang's own internal-state request), never from messages.

Coverage is tracked per parameter, byte by byte (coverage.py): several partial pushes that together write every
byte of every parameter (every stacked shard, every expert) make the weights complete; a push that fails
part-way takes back the coverage of everything it meant to write (those parameters now hold a mix), so they must
be written again.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from .coverage import Coverage, Extent, missing_from, union_coverage, whole

Outcome = Literal["success", "rejected", "failed", "incomplete"]
Source = Literal["ipc", "trainer", "tensor", "disk"]
MISSING_LISTED = 20


class UpdateRecord(msgspec.Struct, frozen=True):
    outcome: Outcome
    source: Source
    message: str
    tensors: int
    bytes: int
    fingerprint: str | None
    finished_at: float
    covers_model: bool = False  # a success that wrote every parameter (data-parallel replicas agree again)


class WeightsReport(msgspec.Struct, frozen=True):
    """What the scheduler tells the HTTP process (and /model_info shows)."""

    state: Literal["waiting", "complete", "incomplete"]
    missing: list[str]  # the first MISSING_LISTED parameters not (fully) written
    missing_count: int
    fingerprint: str | None  # of the weights served now, when one verified update wrote them all
    session_open: bool  # a trainer session (begin ... end_weight_update) is in progress
    last_update: UpdateRecord | None


class WeightsState:
    def __init__(self, required: dict[str, Extent], complete: bool):
        self.required = required
        self.covered: Coverage = self.everything() if complete else {}
        self.incomplete_reason: str | None = None
        self.ever_complete = complete
        self.fingerprint: str | None = None
        self.last_update: UpdateRecord | None = None
        self.writes = 0  # updates that wrote weights (succeeded or failed part-way), by any path
        self.session: Coverage | None = None  # coverage loaded by the open trainer session
        self.session_failed = False
        self._missing: list[str] | None = None  # cached: the generate guard asks on every request

    # ---------------------------------------------------------------- queries
    def everything(self) -> Coverage:
        return {p: whole(extent) for p, extent in self.required.items()}

    def missing(self) -> list[str]:
        if self._missing is None:
            self._missing = missing_from(self.required, self.covered)
        return self._missing

    @property
    def complete(self) -> bool:
        return not self.missing()

    def report(self) -> WeightsReport:
        missing = self.missing()
        state = (
            "complete" if not missing else ("incomplete" if self.incomplete_reason or self.ever_complete else "waiting")
        )
        return WeightsReport(
            state=state,
            missing=missing[:MISSING_LISTED],
            missing_count=len(missing),
            fingerprint=self.fingerprint if not missing else None,
            session_open=self.session is not None,
            last_update=self.last_update,
        )

    # ---------------------------------------------------------------- outcomes
    def _record(
        self, outcome: Outcome, source: Source, message: str, tensors=0, nbytes=0, fingerprint=None, covers=False
    ) -> None:
        self.last_update = UpdateRecord(
            outcome, source, message[:2000], tensors, nbytes, fingerprint, time.time(), covers
        )

    def succeeded(
        self,
        coverage: Coverage,
        source: Source,
        message: str,
        *,
        tensors: int = 0,
        nbytes: int = 0,
        fingerprint: str | None = None,
    ) -> None:
        """An update wrote ``coverage`` and nothing else. ``fingerprint``: it was verified and covered the model."""
        self.writes += 1
        self.covered = union_coverage(self.covered, coverage)
        self._missing = None
        covers_model = not missing_from(self.required, coverage)
        self.fingerprint = fingerprint if (fingerprint and covers_model) else None
        if self.complete:
            self.incomplete_reason = None
            self.ever_complete = True
        self._record("success", source, message, tensors, nbytes, self.fingerprint, covers_model)

    def rejected(self, source: Source, message: str) -> None:
        """Refused before any weight changed: the served weights are what they were."""
        self._record("rejected", source, message)

    def failed_partway(self, planned: Coverage | None, source: Source, message: str) -> None:
        """Weights changed, then the update failed. ``planned``: what it meant to write (None: unknown, i.e.
        possibly everything). Those parameters hold a mix until they are written again."""
        self.writes += 1
        if planned is None:
            self.covered = {}
        else:
            for pname in planned:
                self.covered.pop(pname, None)
        self._missing = None
        self.fingerprint = None
        self.incomplete_reason = message
        self._record("incomplete", source, message)

    def failed_untouched(self, source: Source, message: str) -> None:
        """Failed after it started but before any weight changed."""
        self._record("failed", source, message)

    def reloaded_from_disk(self, message: str, coverage: Coverage | None = None) -> None:
        """``coverage``: what the checked checkpoint wrote (None: SGLang's loader wrote every parameter)."""
        self.succeeded(self.everything() if coverage is None else coverage, "disk", message)

    # ---------------------------------------------------------------- trainer sessions
    def begin_session(self) -> None:
        self.session, self.session_failed = {}, False

    def session_loaded(self, coverage: Coverage) -> None:
        if self.session is not None:
            self.session = union_coverage(self.session, coverage)

    def session_bucket_failed(self, planned: Coverage | None, touched: bool, source: Source, message: str) -> None:
        """A bucket of the open session failed. If it or an earlier bucket wrote weights, they hold a mix."""
        loaded = dict(self.session or {})
        self.session_failed = True
        if touched or loaded:
            if planned is None and touched:
                self.failed_partway(None, source, message)
            else:
                self.failed_partway({**loaded, **(planned or {})} if touched else loaded, source, message)
        else:
            self.rejected(source, message)

    def end_session(self, source: Source) -> None:
        loaded, failed = self.session, self.session_failed
        self.session, self.session_failed = None, False
        if loaded and not failed:
            self.succeeded(loaded, source, f"session loaded {len(loaded)} parameter(s)")
