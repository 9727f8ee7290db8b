"""Two-phase updates against a real SGLang server: the server keeps serving its weights while an update stages,
a loader killed while staging changes nothing, and a commit that fails part-way is retried from the staged bytes.

The server carries a second, test-only SGLang plugin (tests/server_faults, found through its entry point on the
server's PYTHONPATH) that can make the next commit fail after its first bucket.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids

from .conftest import NEW_TOKENS, PROMPT, assert_serves, fault_plugin_env, our_leftovers, push
from .test_e2e_faults import faulty, finish, info, wait_for

pytestmark = pytest.mark.slow
STAGED_TIMEOUT_S = 15  # the server's SGLANG_CKPT_STAGED_TIMEOUT in this module


@pytest.fixture(scope="module")
def server(llama_a, fault_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "two_phase_server.log"
    env = {**fault_plugin_env(fault_dir), "SGLANG_CKPT_STAGED_TIMEOUT": str(STAGED_TIMEOUT_S)}
    with SGLangServer(llama_a, log, env=env) as srv:
        srv.wait_listening()
        push(srv.url, llama_a, "--weight-version", "a-1")
        srv.wait_healthy(timeout_s=60)
        yield srv
    assert srv.group_pids() == []


@pytest.fixture(scope="module")
def outputs(server, llama_a, llama_b) -> dict[str, list[int]]:
    """Each checkpoint's greedy output, from SGLang's own disk reload on this server."""
    out = {}
    for name, ckpt in (("a", llama_a), ("b", llama_b)):
        push(server.url, ckpt, "--weight-version", f"{name}-ref")
        out[name] = assert_serves(server.url, ckpt).disk_ids
    assert out["a"] != out["b"]
    return out


def dropped_or_never_staged(staging: dict, previous_id: str) -> bool:
    """After a killed update: the server dropped what it had staged of it, or never began staging it (killed while
    reading ahead, before the stage call)."""
    return staging["update_id"] == previous_id or staging["state"] in ("failed", "released")


class Client:
    """Generates in a loop from a thread: every answer's weight_version and ids, and every failure."""

    def __init__(self, url: str):
        self.url, self.seen, self.errors = url, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = generate_ids(self.url, PROMPT, NEW_TOKENS)
                self.seen.append((t0, time.monotonic(), r["meta_info"]["weight_version"], r["output_ids"]))
            except (httpx.HTTPError, KeyError, AssertionError) as exc:
                self.errors.append(repr(exc))
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_the_server_keeps_serving_while_an_update_stages(server, llama_a, llama_b, outputs):
    push(server.url, llama_a, "--weight-version", "a-2")
    client = Client(server.url)
    try:
        loader = faulty(
            "pause-after-first-bucket",
            server.url,
            llama_b,
            "--weight-version",
            "b-2",
            "--two-phase",
            "on",
            env={"CKPT_TEST_PAUSE_S": "10"},
        )  # long enough for 3 answers on a loaded machine
        assert loader.stdout.readline().strip() == "paused after bucket 0"
        paused_at = time.monotonic()
        staging = info(server.url)["ckpt_plugin"]["staging"]
        assert staging["state"] == "staging"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        wait_for(lambda: len([s for s in client.seen if s[0] > paused_at]) >= 3, timeout_s=30)
        out, err = finish(loader, 120)
        assert loader.returncode == 0, err
    finally:
        client.close()
    assert client.errors == []
    during = [s for s in client.seen if s[0] > paused_at and s[2] == "a-2"]
    assert len(during) >= 3, "requests sent while the update staged must be answered by the old weights"
    for _, _, version, ids in client.seen:
        assert version in ("a-2", "b-2") and ids == outputs[version[0]], f"{version} answered with other weights"
    doc = info(server.url)
    assert doc["weight_version"] == "b-2" and doc["ckpt_plugin"]["staging"]["state"] == "committed"
    assert_serves(server.url, llama_b)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_loader_killed_while_staging_changes_nothing(server, llama_a, llama_b, outputs, seed):
    push(server.url, llama_a, "--weight-version", f"a-k{seed}")
    before = set(our_leftovers())
    previous = info(server.url)["ckpt_plugin"]["staging"]["update_id"]
    client = Client(server.url)
    try:
        loader = faulty(
            "kill-in-staging",
            server.url,
            llama_b,
            "--weight-version",
            f"b-k{seed}",
            "--two-phase",
            "on",
            env={"CKPT_TEST_SEED": str(seed), "CKPT_TEST_BUCKETS": "3"},
        )
        out, _ = finish(loader, 120)
        assert loader.returncode == -signal.SIGKILL and "killed while staging" in out
        wait_for(lambda: dropped_or_never_staged(info(server.url)["ckpt_plugin"]["staging"], previous), 30)
        wait_for(lambda: len(client.seen) >= 2, 60)  # answers to judge by, whatever the machine's load
    finally:
        client.close()
    assert client.errors == []
    assert client.seen and {v for _, _, v, _ in client.seen} <= {f"a-k{seed}"}
    assert all(ids == outputs["a"] for *_, ids in client.seen)
    doc = info(server.url)
    assert doc["weights_loaded"] and doc["ckpt_plugin"]["weights_state"] == "complete"
    assert doc["weight_version"] == f"a-k{seed}"
    assert set(our_leftovers()) - before == set(), "shared memory or socket files left behind"
    assert_serves(server.url, llama_a)
    push(server.url, llama_b, "--weight-version", f"b-after-k{seed}")  # a fresh update goes through
    assert_serves(server.url, llama_b)


def test_a_failed_commit_is_retried_from_the_staged_bytes(server, llama_a, llama_b, fault_dir):
    push(server.url, llama_a, "--weight-version", "a-r")
    (fault_dir / "fail-next-commit").touch()
    proc = push(server.url, llama_b, "--weight-version", "b-r", "--transfer", "copy", "--bucket-size", "300K")
    assert not (fault_dir / "fail-next-commit").exists(), "the injected fault did not fire"
    assert "commit fault injected by the test" in proc.stderr and "retrying from the staged bytes" in proc.stderr
    assert proc.stdout.count("bytes read from disk per rank") == 1  # read once, committed twice
    doc = info(server.url)
    assert doc["weight_version"] == "b-r" and doc["ckpt_plugin"]["weights_state"] == "complete"
    assert_serves(server.url, llama_b)


def test_a_commit_that_keeps_failing_leaves_the_server_closed_until_a_complete_push(
    server, llama_a, llama_b, fault_dir
):
    push(server.url, llama_a, "--weight-version", "a-f")
    (fault_dir / "fail-next-commit").touch()
    before = set(our_leftovers())
    proc = push(
        server.url, llama_b, "--weight-version", "b-f", "--bucket-size", "300K", "--commit-retries", "0", check=False
    )
    assert proc.returncode == 1 and "commit fault injected by the test" in proc.stderr
    doc = info(server.url)
    assert doc["ckpt_plugin"]["weights_state"] == "incomplete" and not doc["weights_loaded"]
    assert doc["ckpt_plugin"]["staging"]["state"] == "released"  # the loader dropped the staged bytes on its way out
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
    assert set(our_leftovers()) - before == set()
    push(server.url, llama_a, "--weight-version", "a-f2")
    assert_serves(server.url, llama_a)


def test_a_staged_update_nobody_commits_is_released_after_the_timeout(server, llama_a, llama_b):
    push(server.url, llama_a, "--weight-version", "a-t")
    loader = faulty("kill-before-commit", server.url, llama_b, "--weight-version", "b-t", "--two-phase", "on")
    out, _ = finish(loader, 120)
    assert loader.returncode == -signal.SIGKILL and "killed before the commit" in out
    staged = info(server.url)["ckpt_plugin"]["staging"]
    assert staged["state"] == "staged" and staged["bytes"] > 0
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-t"
    wait_for(lambda: info(server.url)["ckpt_plugin"]["staging"]["state"] == "released", STAGED_TIMEOUT_S + 15)
    assert "not committed within" in info(server.url)["ckpt_plugin"]["staging"]["error"]
    # its commit now is refused, the weights untouched
    body = {"zmq_handles": {"cpu-tp0": staged["update_id"], "ckpt_plugin.phase": "commit"}, "weight_version": "b-t"}
    resp = httpx.post(f"{server.url}/update_weights_from_ipc", json=body, timeout=30)
    assert resp.status_code == 400 and "not staged" in resp.json()["message"]
    doc = info(server.url)
    assert doc["weight_version"] == "a-t" and doc["ckpt_plugin"]["weights_state"] == "complete"
    assert doc["ckpt_plugin"]["last_update"]["outcome"] == "rejected"
    assert_serves(server.url, llama_a)


def test_an_update_over_the_staging_budget_streams_and_says_so(server, llama_a, llama_b):
    push(server.url, llama_a, "--weight-version", "a-budget")
    proc = push(server.url, llama_b, "--weight-version", "b-budget", "--transfer", "copy", "--staging-budget", "64K")
    assert "streaming the update (one phase" in proc.stderr and "--staging-budget" in proc.stderr
    assert "staged while the server kept serving" not in proc.stdout
    assert info(server.url)["weight_version"] == "b-budget"
    assert_serves(server.url, llama_b)
    proc = push(
        server.url,
        llama_a,
        "--weight-version",
        "a-on",
        "--staging-budget",
        "64K",
        "--transfer",
        "copy",
        "--two-phase",
        "on",
        check=False,
    )
    assert proc.returncode == 1 and "--two-phase on: staging needs" in proc.stderr
    assert info(server.url)["weight_version"] == "b-budget"


def test_local_push_stages_while_serving_then_commits(server, llama_a, llama_b, outputs):
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.local_push import LocalPush

    tensors = {}
    for f in sorted(llama_b.glob("*.safetensors")):
        tensors.update(load_file(f))
    push(server.url, llama_a, "--weight-version", "a-local")
    with LocalPush(server.url, bucket_bytes=256 << 10) as pusher:
        staged = pusher.stage(tensors.items())
        assert info(server.url)["ckpt_plugin"]["staging"]["state"] == "staged"
        served = generate_ids(server.url, PROMPT, NEW_TOKENS)
        assert served["meta_info"]["weight_version"] == "a-local" and served["output_ids"] == outputs["a"]
        stats = pusher.commit(staged, weight_version="b-local")
        assert stats.buckets > 1 and stats.commit_s > 0
        with pytest.raises(ValueError, match="no longer staged"):
            pusher.commit(staged)
        assert pusher.push(tensors.items(), weight_version="b-local-2").commit_s > 0  # stage + commit in one call
    assert info(server.url)["ckpt_plugin"]["staging"]["state"] == "committed"
    assert_serves(server.url, llama_b)


@pytest.mark.parametrize("bucket_bytes", [None, 256 << 10])
def test_local_push_streams_in_one_exchange_or_through_refilled_buffers(server, llama_a, llama_b, bucket_bytes):
    """Streaming LocalPush: one bucket (the first one is filled while the server checks the manifest), or many
    through two refilled buffers. A tensor of the wrong shape is refused at the hello, while the pusher fills, with
    the server's reason; the served weights stay; the next push lands."""
    from sglang_ckpt_plugin.local_push import LocalPush

    push(server.url, llama_a, "--weight-version", "a-before-stream")
    tensors = checkpoint_tensors(llama_b)
    bad = dict(tensors)
    name = next(n for n, t in bad.items() if t.dim() == 2)
    bad[name] = bad[name][:-1]
    with LocalPush(server.url, bucket_bytes=bucket_bytes, two_phase="off") as pusher:
        with pytest.raises(Exception, match=re.escape(name)):
            pusher.push(bad.items(), weight_version="b-bad-shape")
        assert info(server.url)["weight_version"] == "a-before-stream"
        assert_serves(server.url, llama_a)
        stats = pusher.push(tensors.items(), weight_version="b-streamed")
        assert (stats.buckets == 1) == (bucket_bytes is None) and stats.stage_s == 0
    assert info(server.url)["weight_version"] == "b-streamed"
    assert_serves(server.url, llama_b)


# ---------------------------------------------------------------- one writer of the model at a time
class Background:
    """``fn()`` on a thread; ``result()`` re-raises its exception."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def result(self, timeout_s: float = 180):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


def checkpoint_tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def checksums(server, llama_a, llama_b) -> dict[str, str]:
    """SGLang's /weights_checker checksum after its own disk load of each checkpoint, before any overlap."""
    from sglang_ckpt_plugin.demo import evidence

    out = {}
    for name, ckpt in (("a", llama_a), ("b", llama_b)):
        evidence.reload_from_disk(server.url, ckpt)
        out[name] = evidence.checksum(server.url)
    assert out["a"] != out["b"]
    return out


@pytest.mark.parametrize("other", ["disk-reload", "trainer-bucket"])
def test_a_load_overlapping_a_staged_manifest_check_lands_in_full(
    server, llama_a, llama_b, fault_dir, checksums, other
):
    """A stage of B checks its manifest (held open by the test plugin) while SGLang's own disk reload of A, or a
    trainer session's bucket of A, runs: that load must write every parameter (the checksums of SGLang's own load
    of A), and the stage, committed afterwards, too."""
    from sglang_ckpt_plugin.demo import evidence
    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    def trainer_push():
        with TrainerPush(server.url, timeout_s=120) as trainer:
            trainer.push(checkpoint_tensors(llama_a).items(), weight_version="a-trainer")

    load_a = {"disk-reload": lambda: evidence.reload_from_disk(server.url, llama_a), "trainer-bucket": trainer_push}
    evidence.reload_from_disk(server.url, llama_b)
    hold, held = fault_dir / "hold-dry-run", fault_dir / "dry-run-held"
    hold.touch()
    try:
        with LocalPush(server.url, bucket_bytes=256 << 10) as pusher:
            stage = Background(lambda: pusher.stage(checkpoint_tensors(llama_b).items()))
            wait_for(held.exists, timeout_s=60)
            overlapping = Background(load_a[other])
            time.sleep(1.0)  # while the check is held: a load that does not wait for it runs now
            hold.unlink()
            overlapping.result()
            assert evidence.checksum(server.url) == checksums["a"], f"the {other} of A did not land in full"
            pusher.commit(stage.result(), weight_version="b-after-overlap")
        assert evidence.checksum(server.url) == checksums["b"]
    finally:
        hold.unlink(missing_ok=True)
    evidence.reload_from_disk(server.url, llama_a)  # every later update too
    assert evidence.checksum(server.url) == checksums["a"]
    push(server.url, llama_b, "--weight-version", "b-later")
    assert evidence.checksum(server.url) == checksums["b"]
