"""Data-parallel replicas as the HTTP process sees them: one report per replica, in no fixed order."""

from __future__ import annotations

from sglang_ckpt_plugin.server import replicas, staging
from sglang_ckpt_plugin.server.coverage import Extent
from sglang_ckpt_plugin.server.weights_state import WeightsState


def _report(replica: int, keys: list[str], outcome: str | None = "success", covers: bool = True) -> dict:
    last = None if outcome is None else {"outcome": outcome, "covers_model": covers, "message": f"{outcome} here"}
    return {
        "state": "complete",
        "placement": {"device": "cpu", "rank_keys": keys, "peer_access": True, "replica": replica},
        "last_update": last,
    }


def test_every_rank_of_every_replica_is_published_replica_by_replica():
    reports = [_report(1, ["cpu-dp1-tp0", "cpu-dp1-tp1"]), _report(0, ["cpu-dp0-tp0", "cpu-dp0-tp1"])]
    merged = replicas.merged_placement(reports)
    assert merged["rank_keys"] == ["cpu-dp0-tp0", "cpu-dp0-tp1", "cpu-dp1-tp0", "cpu-dp1-tp1"]
    assert merged["ranks"][3] == {"replica": 1, "pp_rank": 0, "tp_rank": 1, "key": "cpu-dp1-tp1"}
    assert merged["peer_access"] is False  # one loader process never feeds two replicas' GPUs from one GPU
    one = replicas.merged_placement([_report(0, ["GPU-a", "GPU-b"])])
    assert one["peer_access"] is True and one["rank_keys"] == ["GPU-a", "GPU-b"]
    # DP attention: each attention group's leader answers for the one TP group; every rank listed once
    groups = replicas.merged_placement([_report(None, ["GPU-a", "GPU-b"]), _report(None, ["GPU-a", "GPU-b"])])
    assert groups["rank_keys"] == ["GPU-a", "GPU-b"] and groups["peer_access"] is True
    # pipeline stages: one replica's report lists each stage's TP ranks in turn
    stages = _report(None, ["cpu-pp0-tp0", "cpu-pp0-tp1", "cpu-pp1-tp0", "cpu-pp1-tp1"])
    stages["placement"]["pp_size"] = 2
    ranks = replicas.merged_placement([stages])["ranks"]
    assert [(r["pp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_replicas_diverge_when_some_take_an_update_and_agree_again_after_a_whole_update_on_all():
    both = [_report(0, ["a"]), _report(1, ["b"])]
    assert replicas.divergence([True], both[:1], None) is None  # one replica: never
    assert replicas.divergence([False, False], both, None) is None  # nobody took it: same weights as before
    why = replicas.divergence([True, False], both, None, "weight update on cpu-dp1-tp0 failed")
    assert "1 of 2 data-parallel replicas did not take the last update" in why and "cpu-dp1-tp0" in why
    assert replicas.divergence([False, False], both, why) == why  # still apart
    partial = [_report(0, ["a"], covers=False), _report(1, ["b"], covers=False)]
    assert replicas.divergence([True, True], partial, why) == why  # a partial push may not cover what differs
    assert replicas.divergence([True, True], both, why) is None


def test_weights_state_counts_writes_and_records_whether_a_success_covered_the_model():
    state = WeightsState({"w": Extent(4, 1), "v": Extent(2, 1)}, complete=False)
    state.succeeded({"w": ((0, 4),)}, "ipc", "part")
    assert state.writes == 1 and state.last_update.covers_model is False
    state.rejected("ipc", "no")
    assert state.writes == 1
    state.failed_partway(None, "ipc", "boom")
    assert state.writes == 2
    state.reloaded_from_disk("disk")
    assert state.writes == 3 and state.last_update.covers_model is True


class _Session:
    update_id = "u1"
    device = None
    staged_at = 1.0
    staged: list = []

    def run(self):
        return None

    def staged_bytes(self):
        return 0

    def commit(self):
        return "stats"

    def release(self):
        return None


def test_a_committed_update_is_held_until_anything_writes_the_weights_again():
    """A loader retries a commit on every replica when one failed: a replica that committed it and wrote nothing
    since answers without loading it again; after any other write it would be a stale claim."""
    staging.start(_Session())
    staging._current.thread.join()
    staged, _stats = staging.commit("u1")
    staging.mark_committed(staged, writes=5)
    assert staging.holds_committed("u1", 5)
    assert not staging.holds_committed("u2", 5)
    assert not staging.holds_committed("u1", 6)  # a disk reload, a trainer update, another push since
