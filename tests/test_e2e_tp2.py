"""A real SGLang server with --tp 2 on this CPU (gloo carries the TP group): two loader ranks, and a trainer."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer, generate_ids
from sglang_ckpt_plugin.trainer import ServerError, TrainerPush

from .conftest import (
    NEW_TOKENS,
    PROMPT,
    assert_serves,
    fault_plugin_env,
    our_leftovers,
    push,
    run_with_stacks,
    sample,
    scrape,
    serve_other,
)

pytestmark = pytest.mark.slow


def bytes_per_rank(stdout: str) -> list[int]:
    line = next(line for line in stdout.splitlines() if "bytes read from disk per rank" in line)
    return [int(b) for b in re.findall(r"rank \d+: (\d+)", line)]


def copied_per_rank(stdout: str) -> dict[str, int]:
    """Server rank key -> the bytes that rank copied into its weights, as the loader reports them."""
    line = next(x for x in stdout.splitlines() if "bytes each server rank copied" in x)
    ranks = line.split("dtype): ", 1)[1].split(" (of ")[0].split(" | ")
    return {r.split()[0]: int(r.split()[1]) for r in ranks}


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def server(llama_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tp2_server.log"
    with SGLangServer(llama_a, log, tp_size=2, extra_args=["--enable-metrics"]) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


def test_trainer_push_over_the_distributed_group_opens_the_gate(server, llama_b):
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
    # started with the plain cpu_env: the plugin bound one core range per rank from --tp 2 itself
    assert (
        "SGLANG_CPU_OMP_THREADS_BIND=" in server.log_path.read_text()
        and "set by sglang-ckpt-plugin" in server.log_path.read_text()
    )
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in server.env
    waiting = scrape(server.url)  # --enable-metrics with --tp 2: before any weights
    assert sample(waiting, "sglang:ckpt_weights_loaded") == 0 and waiting[("sglang:ckpt_weights_loaded",)] == 0
    assert sample(waiting, "sglang:ckpt_weights_state", state="waiting") == 1
    assert sample(waiting, "sglang:ckpt_updates_total", outcome="success", source="trainer") == 0
    with TrainerPush(server.url, bucket_bytes=300_000, timeout_s=120) as trainer:
        stats = trainer.push(checkpoint_tensors(llama_b).items(), weight_version="trainer-1")
        assert stats.buckets >= 2 and stats.tensors == 21
        # a tensor the model does not have is refused before anything is written; the session closes cleanly
        with pytest.raises(ServerError, match="not_a_weight"):
            trainer.push([("model.not_a_weight", torch.zeros(3))], weight_version="trainer-bad")
    server.wait_healthy(timeout_s=120)
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "trainer-1"
    info = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]
    assert info["weights_state"] == "complete" and info["tp_size"] == 2
    assert info["last_update"]["source"] == "trainer"
    loaded = scrape(server.url)  # the session counted once at its end, then the refused one
    assert sample(loaded, "sglang:ckpt_weights_loaded") == 1
    assert sample(loaded, "sglang:ckpt_weights_state", state="complete") == 1
    assert sample(loaded, "sglang:ckpt_updates_total", outcome="success", source="trainer") == 1
    assert sample(loaded, "sglang:ckpt_updates_total", outcome="rejected", source="trainer") == 1
    assert sample(loaded, "sglang:ckpt_weight_version_info", version="trainer-1") == 1
    assert sample(loaded, "sglang:ckpt_update_seconds_count") == 2
    assert_serves(server.url, llama_b)  # its reference is SGLang's own disk reload: counted too
    assert sample(scrape(server.url), "sglang:ckpt_updates_total", outcome="success", source="disk") == 1


def test_trainer_session_holds_generation_until_it_ends(server, llama_a):
    """A request sent in the middle of a session waits for its end, then runs on the session's weights: its
    version is the session's and its tokens are SGLang's own for that checkpoint (never a mix)."""
    import threading
    import time

    from sglang_ckpt_plugin.trainer import pack_buckets

    result = {}
    with TrainerPush(server.url, bucket_bytes=300_000, timeout_s=120) as trainer:
        buckets = list(pack_buckets(checkpoint_tensors(llama_a).items(), 300_000))
        assert len(buckets) >= 3
        trainer.client.post("/begin_weight_update", {})
        trainer._push_bucket(buckets[0], None, False)
        client = threading.Thread(target=lambda: result.update(generate_ids(server.url, PROMPT, NEW_TOKENS)))
        client.start()
        time.sleep(1.0)  # the request is in (a request arriving later would only make this test weaker)
        for bucket in buckets[1:-1]:
            trainer._push_bucket(bucket, None, False)
        trainer._push_bucket(buckets[-1], "held-a", True)
        assert "output_ids" not in result, "a request ran while the session was open"
        trainer.client.post("/end_weight_update", {})
    client.join(timeout=120)
    assert result["meta_info"]["weight_version"] == "held-a"
    assert result["output_ids"] == assert_serves(server.url, llama_a).disk_ids


def test_trainer_bucket_refused_after_loaded_ones_makes_the_weights_incomplete(server, llama_a, llama_b):
    tensors = list(checkpoint_tensors(llama_b).items()) + [("model.not_a_weight", torch.zeros(3))]
    with TrainerPush(server.url, bucket_bytes=300_000, timeout_s=120) as trainer:
        with pytest.raises(ServerError, match="part-way"):
            trainer.push(tensors, weight_version="mixed")
        info = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]
        assert info["weights_state"] == "incomplete" and info["last_update"]["outcome"] == "incomplete"
        resp = httpx.post(f"{server.url}/generate", json={"input_ids": PROMPT}, timeout=30)
        assert resp.status_code == 503 and "incomplete" in resp.json()["message"]
        trainer.push(checkpoint_tensors(llama_a).items(), weight_version="trainer-a")  # a complete session heals it
    assert httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]["weights_state"] == "complete"
    assert_serves(server.url, llama_a)


@pytest.mark.parametrize("transfer", ["map", "copy"])
def test_one_loader_process_feeds_both_tp_ranks_and_nothing_moves_between_processes(server, llama_a, llama_b, transfer):
    """No torchrun on one node: one process feeds both TP ranks from one set of buffers (the checkpoint files, or
    shared bucket buffers filled once), each rank copying its own slice; bit-exact against SGLang's disk reload."""
    before = set(our_leftovers())
    push(server.url, llama_b, "--inference-parallel-size", "2", "--weight-version", "b")  # A must really arrive
    out = push(
        server.url,
        llama_a,
        "--inference-parallel-size",
        "2",
        "--weight-version",
        "a-tp2",
        "--verify",
        "--transfer",
        transfer,
    )
    assert set(our_leftovers()) - before == set()
    assert "rank 1" not in out.stdout + out.stderr, "a second loader process ran"
    assert "between loader processes: 0 bytes" in out.stdout, out.stdout
    mode = "page cache: 2 server ranks mapped the files" if transfer == "map" else "shared bucket buffers"
    assert mode in out.stdout, out.stdout
    # each rank's load_weights copied its slice, in the server's dtype (the float32 checkpoint's bytes, or half of
    # them in bfloat16): the norms whole, half of every other tensor; the vocabulary (1000 rows) is padded to a
    # multiple of 64 (SGLang's vocab padding) and each rank writes its 512 rows, the padding rows zeroed
    slice_bytes = 0
    for name, t in checkpoint_tensors(llama_a).items():
        if name.endswith("norm.weight"):
            slice_bytes += t.nbytes
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            slice_bytes += -(-t.shape[0] // 64) * 64 // 2 * t[0].nbytes
        else:
            slice_bytes += t.nbytes // 2
    copied = copied_per_rank(out.stdout)
    assert list(copied) == ["cpu-tp0", "cpu-tp1"], out.stdout
    assert set(copied.values()) in ({slice_bytes}, {slice_bytes // 2}), (copied, slice_bytes)
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-tp2"
    fingerprint = out.stdout.split("fingerprint=")[1].split()[0]
    assert httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]["fingerprint"] == fingerprint
    assert_serves(server.url, llama_a)


def test_a_tp2_push_equals_sglang_without_the_plugin_on_the_same_files(server, llama_a, llama_b, fault_dir, tmp_path):
    """The independent reference for TP=2: SGLang without sglang-ckpt-plugin on llama_b, --load-format auto. SGLang
    alone cannot start --tp 2 on a CPU (its pynccl communicator needs CUDA), so the reference loads one test-only
    plugin that turns pynccl off and nothing else (tests/server_faults, ``ckpt_test_gloo_tp``); none of this
    plugin's hooks (disk guard, writer lock, TP hook) touch it."""
    from sglang_ckpt_plugin.cpu_env import core_binds
    from sglang_ckpt_plugin.demo import evidence

    serve_other(server.url, llama_a)  # the push must change what is served
    push(server.url, llama_b, "--inference-parallel-size", "2")
    pushed = evidence.checksum(server.url), generate_ids(server.url, PROMPT, NEW_TOKENS)["output_ids"]
    env = {
        **fault_plugin_env(fault_dir),
        "SGLANG_PLUGINS": f"{PLUGIN_FREE},ckpt_test_gloo_tp",
        "SGLANG_CPU_OMP_THREADS_BIND": core_binds(2),  # sglang-ckpt-plugin sets it when it is loaded
    }
    with SGLangServer(llama_b, tmp_path / "plain_tp2.log", tp_size=2, wait_for_weights=False, env=env) as plain:
        plain.wait_healthy()
        assert "ckpt_plugin" not in httpx.get(f"{plain.url}/model_info", timeout=30).json()
        reference = evidence.checksum(plain.url), generate_ids(plain.url, PROMPT, NEW_TOKENS)["output_ids"]
    assert plain.group_pids() == []
    assert pushed == reference


@pytest.mark.parametrize("transfer", ["map", "copy"])
def test_two_loader_ranks_under_torchrun_on_one_node_take_the_one_copy_path(server, llama_a, llama_b, transfer):
    """``torchrun --nproc-per-node 2`` on one node for a CPU server: loader rank 0 feeds both TP ranks from one set
    of buffers, rank 1 reads and holds nothing, no byte crosses between them; bit-exact against the disk reload."""
    import sys

    from sglang_ckpt_plugin.demo.launch import free_port

    before = set(our_leftovers())
    push(server.url, llama_b, "--inference-parallel-size", "2", "--weight-version", "b")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "sglang_ckpt_plugin.update",
        "--checkpoint-path",
        str(llama_a),
        "--endpoint",
        server.url,
        "--inference-parallel-size",
        "2",
        "--quiet",
        "--timeout",
        "120",
        "--verify",
        "--weight-version",
        "a-tp2",
        "--transfer",
        transfer,
    ]
    out = run_with_stacks(cmd, 300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(our_leftovers()) - before == set()
    read = bytes_per_rank(out.stdout)
    assert len(read) == 2 and read[1] == 0 and (read[0] > 0 or transfer == "map"), read
    assert "between loader processes: 0 bytes" in out.stdout, out.stdout
    mode = "page cache: 2 server ranks mapped the files" if transfer == "map" else "shared bucket buffers (one set"
    assert "[sglang-ckpt rank 0] pushed" in out.stdout and mode in out.stdout, out.stdout
    assert "[sglang-ckpt rank 1] pushed" not in out.stdout, out.stdout
    assert list(copied_per_rank(out.stdout)) == ["cpu-tp0", "cpu-tp1"], out.stdout
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-tp2"
    assert_serves(server.url, llama_a)


def test_one_loader_rank_for_a_tp2_server_is_refused(server, llama_b):
    out = push(server.url, llama_b, "--weight-version", "never", check=False)
    assert out.returncode == 1 and "--inference-parallel-size 2" in out.stderr
    plugin = httpx.get(f"{server.url}/model_info", timeout=30).json()["ckpt_plugin"]
    assert (plugin["device"], plugin["rank_keys"]) == ("cpu", ["cpu-tp0", "cpu-tp1"])  # gathered over the TP group
    assert plugin["peer_access"] is False  # GPU memory only: CPU ranks map the node's shared memory instead
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-tp2"


def test_two_rank_update_rejected_by_the_server_fails_on_every_rank_and_changes_nothing(
    server, llama_a, llama_b, tmp_path
):
    from .test_e2e_faults import _variant

    bad = _variant(  # of the checkpoint not served: a write before the refusal would show
        llama_b,
        tmp_path / "unknown",
        lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": t["model.norm.weight"].clone()},
    )
    before = set(our_leftovers())
    out = push(server.url, bad, "--inference-parallel-size", "2", "--weight-version", "never", check=False)
    assert out.returncode != 0
    # the TP ranks refused at hello, before any write; the loader reports the reason
    assert "[sglang-ckpt] error:" in out.stderr and "extra_proj" in out.stderr, out.stderr[-3000:]
    assert set(our_leftovers()) - before == set()
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-tp2"
    assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
    assert_serves(server.url, llama_a)


def test_tp_ranks_that_disagree_all_record_the_failure(server, llama_a, llama_b):
    """TP rank 0 would succeed; TP rank 1 loads a bucket, then refuses the next (bad digests; both are fed by loader
    rank 0 of a torchrun group). The ranks agree: the update fails on both, both hold a mix, so the server is
    incomplete (gate and guard) until a full push."""
    import sys

    from sglang_ckpt_plugin.demo.launch import free_port

    before = set(our_leftovers())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(Path(__file__).with_name("faulty_loader.py")),
        "corrupt-tp1-after-first",
        "--",
        "--checkpoint-path",
        str(llama_b),
        "--endpoint",
        server.url,
        "--inference-parallel-size",
        "2",
        "--quiet",
        "--timeout",
        "120",
        "--verify",
        "--bucket-size",
        "300K",
        "--weight-version",
        "split",
    ]
    out = run_with_stacks(cmd, 300)
    assert out.returncode != 0 and "[sglang-ckpt] error:" in out.stderr, out.stderr[-3000:]
    assert set(our_leftovers()) - before == set()
    info = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]
    assert info["weights_state"] == "incomplete" and info["last_update"]["outcome"] == "incomplete"
    resp = httpx.post(f"{server.url}/generate", json={"input_ids": PROMPT}, timeout=30)
    assert resp.status_code == 503
    push(server.url, llama_a, "--inference-parallel-size", "2", "--weight-version", "a-tp2")
    assert_serves(server.url, llama_a)


def test_one_rank_that_cannot_allocate_stops_every_rank_at_once_and_changes_nothing(server, llama_b):
    """A rank whose buffer allocation fails (a CUDA OOM; here rank 0, which feeds both TP ranks) meets the others
    at the agreement, not inside a collective (the data group is made before anyone allocates): every rank stops
    at once, nothing changes."""
    import sys
    import time

    from sglang_ckpt_plugin.demo.launch import free_port

    before = set(our_leftovers())
    state = lambda: (lambda i: (i["weight_version"], i["ckpt_plugin"]["weights_state"]))(  # noqa: E731
        httpx.get(f"{server.url}/model_info", timeout=30).json()
    )
    served = state()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(Path(__file__).with_name("faulty_loader.py")),
        "oom",
        "--",
        "--checkpoint-path",
        str(llama_b),
        "--endpoint",
        server.url,
        "--inference-parallel-size",
        "2",
        "--quiet",
        "--timeout",
        "300",
        "--weight-version",
        "oom",
    ]
    t0 = time.monotonic()
    out = run_with_stacks(cmd, 420)
    assert out.returncode != 0 and "CUDA out of memory (injected" in out.stderr, out.stderr[-3000:]
    assert "another loader rank failed" in out.stderr, out.stderr[-3000:]
    # a rank left inside a collective would only stop at its 300 s timeout; starting two ranks takes far less
    assert time.monotonic() - t0 < 200, "a rank waited for its --timeout instead of stopping with the others"
    assert set(our_leftovers()) - before == set()
    assert state() == served


def test_local_push_from_trainer_memory_into_both_tp_ranks_reuses_its_buffers(server, llama_a, llama_b):
    from sglang_ckpt_plugin.local_push import LocalPush

    before = set(our_leftovers())
    with LocalPush(server.url, bucket_bytes=300_000) as pusher:
        stats = pusher.push(checkpoint_tensors(llama_b).items(), weight_version="local-b")
        assert stats.buckets >= 2 and stats.tensors == 21
        inodes = [os.fstat(b.fd).st_ino for b in pusher.buffers]  # the unnamed shared-memory files themselves
        assert_serves(server.url, llama_b)
        pusher.push(checkpoint_tensors(llama_a).items(), weight_version="local-a")
        assert [os.fstat(b.fd).st_ino for b in pusher.buffers] == inodes  # the same memory served the second update
        fds = [b.fd for b in pusher.buffers]
    # unnamed buffers: nothing in /dev/shm at any time, and closing the pusher closed them
    assert set(our_leftovers()) - before == set()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "local-a"
    assert_serves(server.url, llama_a)


def guide_code(path: Path) -> dict:
    """Every ```python block of a doc, run in order in one namespace (what a reader would paste)."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - our own docs, under test
    return namespace


def test_rl_guide_code_runs_as_written(server, llama_a, llama_b, tmp_path):
    """docs/rl.md's code, as written, against this --tp 2 server: colocated sync over steps (buffers kept),
    a sync over SGLang's weight-update group, a failed push that leaves the last version served, and rollouts
    that name the weights that made them. The policy is a Hugging Face model (its named_parameters)."""
    from transformers import AutoModelForCausalLM

    guide = guide_code(Path(__file__).parents[1] / "docs" / "rl.md")
    policy_a = AutoModelForCausalLM.from_pretrained(llama_a, dtype="auto")
    policy_b = AutoModelForCausalLM.from_pretrained(llama_b, dtype="auto")

    sync = guide["ColocatedSync"](server.url)
    try:
        stats = sync.sync(policy_b, step=1)
        assert stats.tensors == 21 and stats.bytes > 0
        _, version = guide["rollout"](server.url, PROMPT)
        assert version == "step-1"
        assert_serves(server.url, llama_b)
        sync.sync(policy_a, step=2)
        ids, version = guide["rollout"](server.url, PROMPT, NEW_TOKENS)
        assert version == "step-2" and len(ids) > 0
        # a broken step (a tensor the model does not have) is refused; step-2 stays served
        broken = [*policy_b.named_parameters(), ("model.layers.0.not_a_weight", torch.zeros(3))]
        assert guide["sync_or_keep_serving"](sync.pusher, server.url, broken, step=3) == "step-2"
    finally:
        sync.close()
    assert_serves(server.url, llama_a)

    guide["sync_over_the_group"](server.url, policy_b, step=4)
    assert guide["rollout"](server.url, PROMPT)[1] == "step-4"
    assert_serves(server.url, llama_b)

    overlapped = guide["OverlappedSync"](server.url)
    try:
        overlapped.stage(policy_a)  # both TP ranks stage; the server serves step-4 meanwhile
        assert guide["rollout"](server.url, PROMPT)[1] == "step-4"
        assert overlapped.commit(step=5).commit_s > 0
        assert guide["rollout"](server.url, PROMPT)[1] == "step-5"
    finally:
        overlapped.close()
    assert_serves(server.url, llama_a)
