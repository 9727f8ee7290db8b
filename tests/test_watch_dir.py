"""Which checkpoints under a watched directory are ready, and what the resident loader does about them: pure
logic on real files (no server)."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from sglang_ckpt_plugin.loader.cli import parse_args
from sglang_ckpt_plugin.loader.resident import Action, InstanceState, choose_action
from sglang_ckpt_plugin.loader.watch_dir import Candidate, CheckpointWatch, incomplete_reason


def copy_slowly_in_parts(src: Path, dst: Path, parts: int = 3):
    """Yield after each part a writer has put down: every shard grows part by part, the index comes last."""
    dst.mkdir()
    shards = sorted(src.glob("*.safetensors"))
    for shard in shards:
        data = shard.read_bytes()
        with open(dst / shard.name, "wb") as f:
            for i in range(parts):
                f.write(data[i * len(data) // parts : (i + 1) * len(data) // parts])
                f.flush()
                yield
    for other in src.iterdir():
        if not other.name.endswith(".safetensors"):
            shutil.copy(other, dst / other.name)
    yield


def test_a_checkpoint_is_ready_only_once_complete_and_unchanged_between_two_scans(llama_b, tmp_path):
    watch = CheckpointWatch(tmp_path)
    for _ in copy_slowly_in_parts(llama_b, tmp_path / "step-7"):
        assert watch.ready() == [] or incomplete_reason(tmp_path / "step-7") is None
    # complete now; the first scan that sees it whole saw it change: ready on the next one
    ready = watch.ready()
    assert [c.version for c in ready] == ["step-7"] and ready[0].order[0] == 7


def test_half_written_checkpoints_are_never_ready(llama_b, tmp_path):
    """At every point of a slow write, scanned twice in a row (as if the writer paused for longer than a scan)."""
    watch = CheckpointWatch(tmp_path)
    states = []
    for _ in copy_slowly_in_parts(llama_b, tmp_path / "step-1"):
        reason = incomplete_reason(tmp_path / "step-1")
        watch.ready()
        states.append((reason, [c.version for c in watch.ready()]))
    shards_written = len(list(llama_b.glob("*.safetensors"))) * 3  # parts
    for reason, ready in states[: shards_written - 1]:
        assert reason is not None and ready == [], states  # a shard missing, or one cut short
    for reason, ready in states[shards_written - 1 :]:  # every shard whole (the index may still be on its way)
        assert (reason, ready) == (None, ["step-1"]), states
    assert any("3 of 4 shards present" in r for r, _ in states[:-1]), states  # caught between two shards


def test_with_a_marker_the_trainer_says_when(llama_a, tmp_path):
    watch = CheckpointWatch(tmp_path, marker="COMPLETE")
    shutil.copytree(llama_a, tmp_path / "step-2")
    assert watch.ready() == [] and watch.ready() == []
    (tmp_path / "step-2" / "COMPLETE").write_text("")
    assert [c.version for c in watch.ready()] == ["step-2"]  # no settling scan


def test_newest_last_by_step_number(llama_a, tmp_path):
    for name in ["step-900", "step-1200", "step-30"]:
        shutil.copytree(llama_a, tmp_path / name)
    (tmp_path / ".tmp-step-2000").mkdir()  # hidden: a trainer's staging area
    watch = CheckpointWatch(tmp_path)
    watch.ready()
    assert [c.version for c in watch.ready()] == ["step-30", "step-900", "step-1200"]


def test_a_broken_header_is_not_ready(llama_a, tmp_path):
    shutil.copytree(llama_a, tmp_path / "step-1")
    shard = next((tmp_path / "step-1").glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    assert "truncated" in incomplete_reason(tmp_path / "step-1")
    os.unlink(shard)
    assert incomplete_reason(tmp_path / "step-1") is not None


def ckpt(version: str, step: int) -> Candidate:
    return Candidate(f"/w/{version}", version, (step, version), ())


UP_B = InstanceState("http://a", True, "complete", "step-1")
DOWN = InstanceState("http://b")


def test_a_new_checkpoint_goes_to_every_instance_that_is_up():
    got = choose_action(ckpt("step-2", 2), ckpt("step-1", 1), [UP_B, DOWN], [True, True])
    assert got == Action("push", "/w/step-2", "step-2", (0,))
    assert choose_action(ckpt("step-2", 2), None, [DOWN, DOWN], [True, True]) == Action()  # nobody to push to


def test_instances_already_serving_the_newest_are_adopted_not_pushed():
    got = choose_action(ckpt("step-1", 1), None, [UP_B, DOWN], [True, True])
    assert got.kind == "adopt" and got.version == "step-1"


@pytest.mark.parametrize(
    "state", [InstanceState("http://b", True, "waiting", None), InstanceState("http://b", True, "incomplete", "step-1")]
)
def test_an_instance_that_comes_back_without_complete_weights_is_refilled_alone(state):
    got = choose_action(None, ckpt("step-1", 1), [UP_B, state], [True, True])
    assert got == Action("refill", "/w/step-1", "step-1", (1,))
    assert choose_action(None, ckpt("step-1", 1), [UP_B, state], [True, False]) == Action()  # retry later
    assert choose_action(None, None, [UP_B, state], [True, True]) == Action()  # nothing served yet


def test_complete_weights_of_another_version_are_left_alone():
    """A disk reload or a trainer's push on one instance: the loader does not fight it (a newer checkpoint will)."""
    other = InstanceState("http://b", True, "complete", "trainer-7")
    assert choose_action(None, ckpt("step-1", 1), [UP_B, other], [True, True]) == Action()


def test_status_file_is_json_an_operator_can_read(tmp_path):
    from types import SimpleNamespace

    from sglang_ckpt_plugin.loader.resident import Resident

    status = tmp_path / "status.json"
    args = parse_args(["--watch", str(tmp_path), "--status-file", str(status)])
    session = SimpleNamespace(world=SimpleNamespace(rank=0), control=None)
    resident = Resident(args, session)
    resident.serving = ckpt("step-1", 1)
    resident.skipped[("/w/step-2", ())] = "update rejected: shape mismatch"
    resident.write_status([UP_B, DOWN])
    got = json.loads(status.read_text())
    assert got["serving"] == {"version": "step-1", "path": "/w/step-1"}
    assert got["skipped"] == [{"path": "/w/step-2", "reason": "update rejected: shape mismatch"}]
    assert [i["up"] for i in got["instances"]] == [True, False] and got["in_progress"] is None


class FixedWatch:
    def __init__(self, candidates):
        self.candidates = candidates

    def ready(self):
        return self.candidates


def resident_deciding(candidates, serving=None):
    from types import SimpleNamespace

    from sglang_ckpt_plugin.loader.resident import Resident

    args = parse_args(["--watch", "/w"])
    resident = Resident(args, SimpleNamespace(world=SimpleNamespace(rank=0), control=None))
    resident.watch, resident.serving = FixedWatch(candidates), serving
    return resident


def test_checkpoints_that_appeared_during_a_push_are_coalesced_the_newest_wins(capsys):
    resident = resident_deciding([ckpt("step-2", 2), ckpt("step-3", 3), ckpt("step-4", 4)], serving=ckpt("step-1", 1))
    assert resident.decide([UP_B]) == Action("push", "/w/step-4", "step-4", (0,))
    assert resident.passed_over == {"/w/step-2", "/w/step-3"}
    assert "passing over step-3: step-4 is newer" in capsys.readouterr().out


def test_a_push_that_failed_is_tried_again_after_a_pause_and_a_behind_instance_is_refilled_meanwhile():
    """A fleet whose push failed on one instance (it went down after the other committed) must not stay split: the
    newest checkpoint is pushed again to every instance up once the pause is over (kill_anywhere.py found a fleet
    left on step-7 and step-8 for good when a failed push skipped its checkpoint at once)."""
    step8 = ckpt("step-8", 8)
    resident = resident_deciding([step8], serving=ckpt("step-7", 7))
    resident.push_retry_at = time.monotonic() + 60
    restarted = InstanceState("http://b", True, "waiting", None)
    assert resident.decide([UP_B, restarted]) == Action("refill", "/w/step-7", "step-7", (1,))
    resident.push_retry_at = 0.0
    assert resident.decide([UP_B, UP_B]) == Action("push", "/w/step-8", "step-8", (0, 1))


def test_a_skipped_checkpoint_is_tried_again_only_once_its_files_change():
    step2 = ckpt("step-2", 2)
    resident = resident_deciding([step2], serving=ckpt("step-1", 1))
    resident.skipped[(step2.path, step2.signature)] = "update rejected: shape mismatch"
    assert resident.decide([UP_B]) == Action()
    rewritten = Candidate(step2.path, step2.version, step2.order, (("model.safetensors", 10, 1),))
    resident.watch = FixedWatch([rewritten])
    assert resident.decide([UP_B]).kind == "push"


@pytest.mark.parametrize("nccl_failed", [False, True])
def test_a_resident_group_whose_nccl_communicator_failed_stops_instead_of_failing_every_later_update(
    tmp_path, nccl_failed
):
    """A failed update on a group whose NCCL data group broke (the alarm sounded, the peers aborted their
    communicator; the alarm's key stays in the store): the group stops with an error, so torchrun's --max-restarts
    starts it with a new communicator. Any other failed update is tried again, and skipped once it failed
    PUSH_ATTEMPTS times; the group goes on watching."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from sglang_ckpt_plugin.loader.push import PushError
    from sglang_ckpt_plugin.loader.rank_setup import PeerFailed
    from sglang_ckpt_plugin.loader.resident import Resident
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld, PeerAlarm

    world = LoaderWorld()
    control = Control(world, timeout_s=60)
    control.alarm = PeerAlarm(dist.HashStore())
    if nccl_failed:
        control.alarm.sound("loader rank 1: DistBackendError: NCCL error: unhandled system error")

    def failing_update(args, receivers):
        def run():
            raise (PeerFailed if nccl_failed else PushError)("the update failed")

        return SimpleNamespace(run=run)

    session = SimpleNamespace(
        world=world, control=control, route=SimpleNamespace(feeding=SimpleNamespace(feeders=[0])), update=failing_update
    )
    args = parse_args(["--watch", str(tmp_path), "--timeout", "60"])
    resident = Resident(args, session)
    resident.newest = ckpt("step-2", 2)
    action = Action("push", "/w/step-2", "step-2", (0,))
    if nccl_failed:
        with pytest.raises(PeerFailed, match="NCCL communicator failed .*unhandled system error.*--max-restarts"):
            resident.execute(action, [UP_B])
    else:  # tried again after a pause (a server may be coming back), skipped once it failed PUSH_ATTEMPTS times
        from sglang_ckpt_plugin.loader.resident import PUSH_ATTEMPTS

        key = ("/w/step-2", ckpt("step-2", 2).signature)
        for attempt in range(1, PUSH_ATTEMPTS):
            resident.execute(action, [UP_B])
            assert key not in resident.skipped and resident.failed_pushes[key] == attempt
            assert resident.push_retry_at > time.monotonic()
        resident.execute(action, [UP_B])
        assert resident.skipped[key] == "the update failed"
