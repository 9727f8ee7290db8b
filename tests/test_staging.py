"""The staged-update state machine of one scheduler process (server/staging.py) and the loader's staging decision,
without a server: the session here is a stand-in for ReceiveSession that records what was asked of it."""

from __future__ import annotations

import threading
import time

import pytest

from sglang_ckpt_plugin.loader.plan import staging_problem
from sglang_ckpt_plugin.server import staging
from sglang_ckpt_plugin.server.receiver import UpdateFailed, UpdateRefused


class Session:
    def __init__(self, update_id: str, fail_run: Exception | None = None, fail_commits: int = 0):
        self.update_id, self.fail_run, self.fail_commits = update_id, fail_run, fail_commits
        self.staged, self.commits, self.released = [], 0, 0
        self.staged_at = None  # ReceiveSession's wall-clock time of its last check (None: the registry's clock)
        self.go = threading.Event()
        self.go.set()

    def run(self):
        self.go.wait(5)
        if self.fail_run:
            raise self.fail_run

    def commit(self):
        self.commits += 1
        if self.commits <= self.fail_commits:
            raise UpdateFailed("injected")
        return "stats"

    def staged_bytes(self) -> int:
        return 123

    def release(self):
        self.released += 1


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(staging, "_current", None)
    yield
    if staging._current is not None and staging._current._timer is not None:
        staging._current._timer.cancel()


def settle():
    staging._current.thread.join(5)


def test_stage_then_commit_releases_the_staged_bytes():
    s = Session("u1")
    staging.start(s)
    settle()
    assert staging.report().state == "staged" and staging.report().bytes == 123
    with pytest.raises(UpdateRefused, match="nothing staged under update other"):
        staging.commit("other")
    staged, stats = staging.commit("u1")
    assert stats == "stats" and s.released == 1
    report = staging.report()
    assert report.state == "committed" and report.committed_at >= report.staged_at
    with pytest.raises(UpdateRefused, match="committed on this rank, not staged"):
        staging.commit("u1")  # a commit is not applied twice


def test_a_failed_commit_keeps_the_bytes_for_a_retry():
    s = Session("u2", fail_commits=1)
    staging.start(s)
    settle()
    with pytest.raises(UpdateFailed, match="injected"):
        staging.commit("u2")
    assert staging.report().state == "staged" and s.released == 0 and staging._current.commit_failed
    staging.commit("u2")
    assert s.commits == 2 and s.released == 1


def test_a_commit_waits_for_the_receiving_thread_to_finish():
    s = Session("u3")
    s.go.clear()
    staging.start(s)
    threading.Timer(0.3, s.go.set).start()
    staging.commit("u3")  # the loader had its last reply; the thread marks it staged a moment later
    assert s.commits == 1


def test_the_report_of_an_update_that_answered_its_finish_says_staged():
    """The loader has its last reply (the session stamped staged_at before sending it) and may be gone the next
    instant: /model_info must not show it as still staging while the thread records the outcome."""
    s = Session("u5")
    s.go.clear()
    staging.start(s)
    assert staging.report().state == "staging"  # still receiving: answered at once, no wait
    s.staged_at = time.time()
    threading.Timer(0.3, s.go.set).start()
    assert staging.report().state == "staged"


def test_a_failed_stage_cannot_be_committed_and_abort_reports_why():
    s = Session("u4", fail_run=UpdateRefused("update rejected: shape mismatch"))
    staging.start(s)
    settle()
    with pytest.raises(UpdateRefused, match="failed on this rank, not staged: update rejected"):
        staging.commit("u4")
    dropped = staging.abort("u4")
    assert dropped.refused and "shape mismatch" in dropped.error and staging.report().state == "released"
    assert staging.abort("u4") is None or staging.report().state == "released"


def test_a_staged_update_nobody_commits_is_released_after_the_timeout(monkeypatch):
    monkeypatch.setenv(staging.STAGED_TIMEOUT_ENV, "0.2")
    s = Session("u5")
    staging.start(s)
    settle()
    deadline = time.monotonic() + 5
    while staging.report().state != "released" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staging.report().state == "released" and "not committed within 0.2 s" in staging.report().error
    assert s.released == 1
    with pytest.raises(UpdateRefused, match="released"):
        staging.commit("u5")


def test_a_new_stage_replaces_an_uncommitted_one():
    old, new = Session("old"), Session("new")
    staging.start(old)
    settle()
    staging.start(new)
    settle()
    assert old.released == 1 and staging.report().update_id == "new"
    with pytest.raises(UpdateRefused, match="nothing staged under update old"):
        staging.commit("old")


def test_staging_fits_the_budget_with_every_local_rank_counted():
    assert staging_problem([100, 100], 1, 200, "cpu") is None
    assert "0.00 GB" in staging_problem([100, 100], 2, 300, "cpu")  # two ranks of this node hold 400 bytes
    assert "--device cpu" in staging_problem([1], 1, 10**12, "cuda")
    assert "raise --bucket-size" in staging_problem([1] * 254, 1, 10**12, "cpu")


def test_an_abort_waits_for_the_thread_to_record_why_staging_failed():
    """The loader aborts as soon as it reads the rank's error reply; the rank's thread records the refusal a
    moment later. The abort must report that refusal, not its own reason."""
    s = Session("u6", fail_run=UpdateRefused("update rejected: shape mismatch"))
    s.go.clear()
    staging.start(s)
    threading.Timer(0.3, s.go.set).start()
    dropped = staging.abort("u6")
    assert dropped.refused and "shape mismatch" in dropped.error
