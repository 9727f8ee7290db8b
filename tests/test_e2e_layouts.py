"""A real SGLang server with data-parallel replicas (``--dp 2``: two schedulers, each its own TP group) on dummy
weights: every push fills every replica, a replica that refuses or fails changes what no client is served, and a
retried commit lands only where it failed.

The server carries the test-only fault plugin (tests/server_faults): ``refuse-next-stage`` and ``fail-next-commit``
are consumed by the first replica that meets them, so exactly one replica refuses or fails while the other goes on.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids
from sglang_ckpt_plugin.trainer import TrainerPush

from .conftest import (
    NEW_TOKENS,
    PROMPT,
    assert_closed,
    assert_serves,
    fault_server,
    our_leftovers,
    plugin_info,
    push,
    serve_other,
)
from .test_e2e_tp2 import checkpoint_tensors, copied_per_rank

pytestmark = pytest.mark.slow

RANKS = ["cpu-dp0-tp0", "cpu-dp1-tp0"]


@pytest.fixture(scope="module")
def server(llama_a, fault_dir, tmp_path_factory):
    yield from fault_server(
        llama_a, fault_dir, tmp_path_factory, "dp2_server.log", extra_args=["--dp-size", "2", "--sleep-on-idle"]
    )


def serve(server, checkpoint: Path, *extra: str):
    """Push ``checkpoint`` into both replicas (the state a test starts from); the loader's output."""
    out = push(server.url, checkpoint, "--inference-parallel-size", "2", *extra)
    assert plugin_info(server.url)["weights_state"] == "complete"
    return out


def test_every_push_fills_both_replicas_and_serves_what_sglang_loads(server, llama_a, llama_b):
    """/model_info lists every rank of every replica; the gate holds until both replicas are written; a push in two
    phases and one streaming (one phase) each serve bit-exactly what SGLang's own reload of the files serves."""
    closed = assert_closed(server.url)["ckpt_plugin"]
    assert (closed["tp_size"], closed["dp_size"]) == (1, 2)
    assert closed["rank_keys"] == RANKS
    assert closed["ranks"] == [{"replica": d, "pp_rank": 0, "tp_rank": 0, "key": k} for d, k in enumerate(RANKS)]
    one = push(server.url, llama_b, check=False)  # the loader counts ranks, not TP ranks
    assert one.returncode == 1 and "runs 2 rank(s) (tp 1 x dp 2)" in one.stderr, one.stderr[-2000:]
    assert "pass --inference-parallel-size 2" in one.stderr
    assert_closed(server.url)

    out = serve(server, llama_b, "--weight-version", "dp-b")
    assert "staged while the server kept serving, then committed" in out.stderr + out.stdout
    copied = copied_per_rank(out.stderr + out.stdout)
    assert list(copied) == RANKS and copied[RANKS[0]] == copied[RANKS[1]] > 0  # each replica its own full copy
    assert "between loader processes: 0 bytes" in out.stderr + out.stdout  # one loader process maps both
    checks = httpx.post(f"{server.url}/weights_checker", json={"action": "checksum"}, timeout=60).json()
    assert len(checks["ranks"]) == 2 and checks["ranks"][0]["checksums"] == checks["ranks"][1]["checksums"]
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "dp-b"
    assert_serves(server.url, llama_b)

    out = serve(server, llama_a, "--two-phase", "off")  # streaming into both replicas at once
    assert "then committed" not in out.stderr + out.stdout
    assert_serves(server.url, llama_a)


def test_a_replica_that_refuses_to_stage_changes_no_replica(server, fault_dir, llama_a, llama_b):
    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    served = evidence.checksum(server.url)
    (fault_dir / "refuse-next-stage").touch()
    out = push(server.url, llama_b, "--inference-parallel-size", "2", check=False)
    assert out.returncode != 0 and "stage refused by the test's fault" in out.stderr, out.stderr[-3000:]
    assert not (fault_dir / "refuse-next-stage").exists()  # one replica met it; the other staged, then dropped it
    state = plugin_info(server.url)
    assert state["weights_loaded"] is True and state["replicas_diverged"] is None
    assert evidence.checksum(server.url) == served  # both replicas still hold llama_a
    assert_serves(server.url, llama_a)


def test_a_commit_that_fails_on_one_replica_closes_the_server_until_both_take_a_whole_update(
    server, fault_dir, llama_a, llama_b
):
    """One replica commits llama_b, the other fails part-way: no client is served either replica's weights until a
    push of the whole model lands on both."""
    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    before = set(our_leftovers())
    (fault_dir / "fail-next-commit").touch()
    out = push(server.url, llama_b, "--inference-parallel-size", "2", "--commit-retries", "0", check=False)
    assert out.returncode != 0 and "commit fault injected by the test" in out.stderr, out.stderr[-3000:]
    state = assert_closed(server.url)["ckpt_plugin"]
    assert "1 of 2 data-parallel replicas did not take the last update" in state["replicas_diverged"]
    assert state["weights_state"] == "incomplete"
    body = httpx.post(f"{server.url}/generate", json={"input_ids": PROMPT}, timeout=30).json()
    assert "differ between replicas" in body["message"]
    serve(server, llama_b)
    assert plugin_info(server.url)["replicas_diverged"] is None
    assert_serves(server.url, llama_b)
    assert set(our_leftovers()) - before == set()


def test_a_retried_commit_loads_only_the_replica_that_failed(server, fault_dir, llama_a, llama_b):
    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    (fault_dir / "fail-next-commit").touch()  # llama_b: four files, four buckets; the fault strikes at the second
    out = serve(server, llama_b, "--commit-retries", "1")
    said = out.stdout + out.stderr
    assert "retrying from the staged bytes" in said, said[-3000:]
    # the replica that had committed answers the retry without loading again; the other loads its staged bytes
    assert said.count("committed on cpu-dp") == 1 and "already; nothing written since" in said, said[-3000:]
    assert plugin_info(server.url)["replicas_diverged"] is None
    assert_serves(server.url, llama_b)


def test_local_push_fills_both_replicas_and_a_trainer_group_is_refused_in_words(server, llama_a, llama_b):
    from sglang_ckpt_plugin.local_push import LocalPush

    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    with LocalPush(server.url, bucket_bytes=300_000) as pusher:
        stats = pusher.push(checkpoint_tensors(llama_b).items(), weight_version="local-b")
        assert stats.tensors == 21 and pusher.rank_keys == RANKS
    assert_serves(server.url, llama_b)
    with pytest.raises(ValueError, match="this server runs tp 1 x dp 2"):
        TrainerPush(server.url).connect()
    assert_serves(server.url, llama_b)


def test_a_resident_loader_keeps_both_replicas_on_the_newest_checkpoint(server, llama_a, llama_b, tmp_path):
    import json
    import shutil
    import signal
    import subprocess
    import sys

    from .test_e2e_watch import serves_version, wait_for

    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    watched, status, log = tmp_path / "ckpts", tmp_path / "status.json", tmp_path / "loader.log"
    watched.mkdir()
    cmd = [sys.executable, "-m", "sglang_ckpt_plugin.update", "--watch", str(watched), "--endpoint", server.url]
    cmd += ["--inference-parallel-size", "2", "--status-file", str(status), "--poll-s", "0.2", "--quiet"]
    with open(log, "w") as out:
        loader = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        shutil.copytree(llama_b, watched / "step-1")
        wait_for(serves_version(server.url, "step-1"), "serving step-1", loader, log)
        assert_serves(server.url, llama_b)
        shutil.copytree(llama_a, watched / "step-2")
        wait_for(serves_version(server.url, "step-2"), "serving step-2", loader, log)
        assert_serves(server.url, llama_a)
        assert json.loads(status.read_text())["serving"]["version"] == "step-2"
    finally:
        loader.send_signal(signal.SIGTERM)
        assert loader.wait(timeout=60) == 0, log.read_text()


def rank_checksums(url: str) -> list[str]:
    """SGLang's checksum of every rank's parameters (each attention group's leader reports its TP group)."""
    checks = httpx.post(f"{url}/weights_checker", json={"action": "checksum"}, timeout=120).json()
    assert checks["success"], checks
    return [r["per_gpu_checksum"] for r in checks["ranks"]]


def test_data_parallel_attention_on_mla_and_moe_takes_every_push_as_sglang_loads_it(ckpt_root, tmp_path):
    """``--tp 2 --attn-dp-size 2`` (SGLang's spelling of ``--dp 2 --enable-dp-attention``) on a tiny DeepSeek-V3
    (MLA with q-LoRA, MoE with a shared expert): attention whole on each rank, experts split. SGLang 0.5.23's CPU
    forward cannot run DP attention (TorchNativeAttnBackend lacks get_cpu_graph_seq_len_fill_value), so the server
    skips its warm-up and nothing generates; the evidence is every rank's checksums against SGLang's own disk
    reload of the same files, for two different checkpoints in turn."""
    from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

    from .test_e2e_faults import _variant

    a = make_tiny_model(ckpt_root / "dpa_deepseek_a", "deepseek_v3", seed=3, vocab=512)
    b = make_tiny_model(ckpt_root / "dpa_deepseek_b", "deepseek_v3", seed=4, vocab=512)
    expert = "model.layers.1.mlp.experts.1.down_proj.weight"
    lacking = _variant(b, tmp_path / "lacking", lambda t: {k: v for k, v in t.items() if k != expert})
    args = ["--attn-dp-size", "2", "--skip-server-warmup", "--sleep-on-idle"]
    with SGLangServer(a, tmp_path / "dpa_server.log", tp_size=2, extra_args=args) as srv:
        srv.wait_listening()
        state = plugin_info(srv.url)
        assert (state["tp_size"], state["dp_size"], state["attn_dp_size"]) == (2, 1, 2)
        assert state["rank_keys"] == ["cpu-tp0", "cpu-tp1"]
        out = push(srv.url, lacking, "--inference-parallel-size", "2", "--partial")
        state = plugin_info(srv.url)
        assert state["weights_state"] == "waiting" and any("experts" in m for m in state["missing"]), state
        served = {}
        for checkpoint in (b, a):  # each push replaces what the server holds (b after the partial, a after b)
            out = push(srv.url, checkpoint, "--inference-parallel-size", "2")
            assert list(copied_per_rank(out.stdout + out.stderr)) == ["cpu-tp0", "cpu-tp1"]
            assert plugin_info(srv.url)["weights_state"] == "complete"
            served[checkpoint] = rank_checksums(srv.url)
            evidence.reload_from_disk(srv.url, checkpoint)
            assert rank_checksums(srv.url) == served[checkpoint]
            assert len(set(served[checkpoint])) == 2  # the two ranks hold different expert slices
        assert set(served[a]).isdisjoint(served[b])
    assert srv.group_pids() == [], "server processes left behind"


def test_expert_parallel_ranks_are_each_written_and_counted_for_the_experts_they_own(ckpt_root, tmp_path):
    """``--tp 2 --ep-size 2`` on a tiny Qwen3-MoE (4 experts a layer): each rank holds 2 experts. A push lacking
    experts 1-3 is refused, and as a partial push keeps the gate shut; full pushes of two checkpoints in turn equal
    SGLang's own disk reload on every rank. SGLang 0.5.23's CPU MoE forward cannot run EP (``moe_forward_native``
    meets expert id -1), so the server skips its warm-up and nothing generates: checksums are the evidence."""
    import re

    from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

    from .test_e2e_moe import LACKING, without

    a = make_tiny_model(ckpt_root / "ep_qwen3_moe_a", "qwen3_moe", seed=5)
    b = make_tiny_model(ckpt_root / "ep_qwen3_moe_b", "qwen3_moe", seed=6)
    lacking = without(b, tmp_path / "lacking", LACKING)
    args = ["--ep-size", "2", "--skip-server-warmup", "--sleep-on-idle"]
    with SGLangServer(a, tmp_path / "ep_server.log", tp_size=2, extra_args=args) as srv:
        srv.wait_listening()
        refused = push(srv.url, lacking, "--inference-parallel-size", "2", check=False)
        assert refused.returncode != 0 and re.search(r"does not cover \d+ parameter.*experts", refused.stderr)
        push(srv.url, lacking, "--inference-parallel-size", "2", "--partial")
        state = plugin_info(srv.url)
        # TP rank 0 owns experts 0-1 of each layer: of its two, the second (expert 1) is unwritten
        owned = r"experts\.w13_weight \(unwritten: dim-0 index 1 of 2\)"
        assert state["weights_state"] == "waiting" and any(re.search(owned, m) for m in state["missing"]), state
        served = {}
        for checkpoint in (b, a):
            push(srv.url, checkpoint, "--inference-parallel-size", "2")
            assert plugin_info(srv.url)["weights_state"] == "complete"
            served[checkpoint] = rank_checksums(srv.url)
            evidence.reload_from_disk(srv.url, checkpoint)
            assert rank_checksums(srv.url) == served[checkpoint]
            assert len(set(served[checkpoint])) == 2  # each rank its own experts
        assert set(served[a]).isdisjoint(served[b])
    assert srv.group_pids() == [], "server processes left behind"
