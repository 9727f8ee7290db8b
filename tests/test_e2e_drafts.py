"""A real SGLang server with a speculative-decoding draft model: DeepSeek-V3's architecture (MLA, MoE, q-LoRA) with
its multi-token-prediction layer served by a NextN draft (``--speculative-algorithm NEXTN``), started on dummy
weights. The draft reads the target's checkpoint (``model.layers.{N}.*``) and serves with the target's embeddings and
lm_head: one update writes both, and the gate waits for both.

SGLang 0.5.23 cannot decode speculatively on this CPU: it has no draft attention backend for ``torch_native`` ("EAGLE
is not supported in decode attention backend torch_native") and its CPU decode needs
``sgl_kernel.assign_req_to_token_pool_cpu``. The servers here (ours and the plugin-free reference) load the test-only
plugin ``ckpt_test_cpu_draft`` (tests/server_faults) that leaves the draft's attention backends out, so they start,
load, update and checksum the target and the draft, and never generate. The evidence is SGLang's own
``/weights_checker``, which names the draft's parameters ``draft.<name>``, against SGLang's own disk reload of the
same files (which SGLang hands to the draft too) and against SGLang without sglang-ckpt-plugin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

from .conftest import assert_closed, fault_plugin_env, fault_server, plugin_info, push, serve_other

pytestmark = pytest.mark.slow

SPEC = [
    "--speculative-algorithm",
    "NEXTN",
    "--speculative-num-steps",
    "1",
    "--speculative-eagle-topk",
    "1",
    "--speculative-num-draft-tokens",
    "2",
    "--skip-server-warmup",  # SGLang's warm-up would decode
    "--sleep-on-idle",
]
SHARED = ("draft.model.embed_tokens.weight", "draft.lm_head.weight")  # the target's own, as SGLang shares them


@pytest.fixture(scope="module")
def mtp_a(ckpt_root) -> Path:
    return make_tiny_model(ckpt_root / "mtp_a", "deepseek_v3", seed=13)


@pytest.fixture(scope="module")
def mtp_b(ckpt_root) -> Path:
    return make_tiny_model(ckpt_root / "mtp_b", "deepseek_v3", seed=14)


@pytest.fixture(scope="module")
def server(mtp_a, fault_dir, tmp_path_factory):
    yield from fault_server(mtp_a, fault_dir, tmp_path_factory, "nextn_server.log", extra_args=SPEC)


@pytest.fixture(scope="module")
def at_start(server) -> dict:
    """/model_info before anything was pushed (module-scoped: taken by whichever test asks first, before its push)."""
    return assert_closed(server.url)["ckpt_plugin"]


def checksums(url: str) -> dict[str, str]:
    return evidence.parameter_checksums(url)


def drafts_own(sums: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in sums.items() if name.startswith("draft.") and name not in SHARED}


def test_one_push_writes_the_target_and_its_mtp_draft_as_sglang_loads_them(server, at_start, mtp_a, mtp_b):
    """The gate waits for the draft's parameters too; a push in two phases, then one streaming, each write the
    target and the NextN draft bit-exactly as SGLang's own reload of the same files does, and each changes both."""
    assert at_start["weights_state"] == "waiting"
    out = push(server.url, mtp_b, "--weight-version", "mtp-b")
    assert "staged while the server kept serving, then committed" in out.stderr + out.stdout
    pushed_b = checksums(server.url)
    draft_b = drafts_own(pushed_b)
    assert len(draft_b) >= 15 and "draft.model.decoder.mlp.experts.w13_weight" in draft_b, sorted(pushed_b)
    # every parameter of both models, less the two the draft shares with the target, was waited for
    assert at_start["missing_count"] == len(pushed_b) - len(SHARED)
    assert plugin_info(server.url)["weights_state"] == "complete"
    assert httpx.get(f"{server.url}/model_info", timeout=30).json()["weight_version"] == "mtp-b"
    evidence.reload_from_disk(server.url, mtp_b)
    assert checksums(server.url) == pushed_b

    push(server.url, mtp_a, "--two-phase", "off")  # streaming: each bucket into the target, then the draft
    pushed_a = checksums(server.url)
    changed = [name for name, value in drafts_own(pushed_a).items() if value != draft_b[name]]
    assert len(changed) >= len(draft_b) - 2, changed  # the router's zero bias is the same in both checkpoints
    evidence.reload_from_disk(server.url, mtp_a)
    assert checksums(server.url) == pushed_a


def test_a_checkpoint_without_the_mtp_layer_is_refused_before_anything_is_written(server, mtp_a, mtp_b, tmp_path):
    """The draft's own parameters must be in a complete update: a checkpoint without them (the target's files
    only) is refused in words, and the server keeps serving what it served, target and draft."""
    serve_other(server.url, mtp_a)
    before = checksums(server.url)
    target_only = tmp_path / "no_mtp"
    target_only.mkdir()
    for file in mtp_b.iterdir():
        if file.name not in ("mtp.safetensors", "model.safetensors.index.json"):
            shutil.copy(file, target_only / file.name)
    index = json.loads((mtp_b / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != "mtp.safetensors"}
    (target_only / "model.safetensors.index.json").write_text(json.dumps(index))
    out = push(server.url, target_only, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the draft model (draft.*): the update does not cover" in out.stderr, out.stderr[-2000:]
    assert "draft.model.decoder" in out.stderr or "'model.decoder." in out.stderr  # names the draft's parameters
    assert checksums(server.url) == before
    assert plugin_info(server.url)["weights_state"] == "complete"


@pytest.mark.parametrize("pusher", ["TrainerPush", "LocalPush"])
def test_a_trainers_push_writes_the_draft_too(server, mtp_a, mtp_b, pusher):
    """TrainerPush: SGLang hands the tensors its weight-update group received to the draft after the target, and the
    plugin measures both. LocalPush: the same receive session as the loader's, target then draft, bucket by bucket."""
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    serve_other(server.url, mtp_a)
    before = drafts_own(checksums(server.url))
    tensors = {**load_file(mtp_b / "model.safetensors"), **load_file(mtp_b / "mtp.safetensors")}
    if pusher == "TrainerPush":
        with TrainerPush(server.url, timeout_s=120) as trainer:
            trainer.push(tensors.items(), weight_version="trainer-b")
    else:
        with LocalPush(server.url, bucket_bytes=300_000) as local:
            local.push(tensors.items(), weight_version="local-b")
    pushed = checksums(server.url)
    assert plugin_info(server.url)["weights_state"] == "complete"
    assert sum(value != before[name] for name, value in drafts_own(pushed).items()) >= len(before) - 2
    evidence.reload_from_disk(server.url, mtp_b)
    assert checksums(server.url) == pushed


def test_a_push_equals_sglang_without_the_plugin_on_the_same_files(server, mtp_a, mtp_b, fault_dir, tmp_path):
    """The independent reference: SGLang started on mtp_b with the same draft, without sglang-ckpt-plugin (only the
    test plugin that lets a draft start on this CPU)."""
    serve_other(server.url, mtp_a)
    push(server.url, mtp_b)
    pushed = checksums(server.url)
    env = {**fault_plugin_env(fault_dir), "SGLANG_PLUGINS": f"{PLUGIN_FREE},ckpt_test_cpu_draft"}
    with SGLangServer(mtp_b, tmp_path / "plain_nextn.log", wait_for_weights=False, env=env, extra_args=SPEC) as plain:
        plain.wait_listening()
        assert "ckpt_plugin" not in httpx.get(f"{plain.url}/model_info", timeout=30).json()
        reference = checksums(plain.url)
    assert plain.group_pids() == []
    assert drafts_own(reference) and pushed == reference


def test_a_draft_with_a_checkpoint_of_its_own_changes_with_the_target_in_one_update(
    llama_a, llama_b, fault_dir, tmp_path
):
    """STANDALONE with a draft of its own (a one-layer Llama): a push without the draft's checkpoint is refused in
    words before a byte moves; SGLang's own disk reload passes the plugin untouched (the gate counts the target);
    a push with ``--draft-checkpoint-path`` writes both in one update (two phases, then streaming), equal to SGLang
    started without the plugin on the same target and draft."""
    draft_a = make_tiny_model(tmp_path / "draft_a", "llama", seed=21, layers=1)
    draft_b = make_tiny_model(tmp_path / "draft_b", "llama", seed=22, layers=1)
    own = ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(draft_a), *SPEC[2:]]
    with SGLangServer(llama_a, tmp_path / "standalone.log", env=fault_plugin_env(fault_dir), extra_args=own) as srv:
        srv.wait_listening()
        out = push(srv.url, llama_b, check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"loads a checkpoint of its own ({draft_a.resolve()})" in out.stderr, out.stderr[-2000:]
        assert "--draft-checkpoint-path DIR" in out.stderr
        assert plugin_info(srv.url)["weights_state"] == "waiting"
        evidence.reload_from_disk(srv.url, llama_a)
        assert plugin_info(srv.url)["weights_state"] == "complete"

        out = push(srv.url, llama_b, "--draft-checkpoint-path", str(draft_b))
        assert "staged while the server kept serving, then committed" in out.stderr + out.stdout
        pushed_b = checksums(srv.url)
        push(srv.url, llama_a, "--draft-checkpoint-path", str(draft_a), "--two-phase", "off")
        pushed_a = checksums(srv.url)
    assert srv.group_pids() == []
    draft_keys = [name for name in pushed_a if name.startswith("draft.")]
    assert draft_keys and all(pushed_a[name] != pushed_b[name] for name in draft_keys)  # each push wrote the draft
    env = {**fault_plugin_env(fault_dir), "SGLANG_PLUGINS": f"{PLUGIN_FREE},ckpt_test_cpu_draft"}
    with SGLangServer(llama_a, tmp_path / "plain.log", wait_for_weights=False, env=env, extra_args=own) as plain:
        plain.wait_listening()
        assert "ckpt_plugin" not in httpx.get(f"{plain.url}/model_info", timeout=30).json()
        assert checksums(plain.url) == pushed_a
    assert plain.group_pids() == []
