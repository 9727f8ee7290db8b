"""Block-FP8 checkpoints (DeepSeek-V3/R1's format) on real SGLang servers: a tiny FP8 Qwen3 server on dummy weights
takes pushes of A, then B (two-phase through the page cache, streaming through shared-memory buckets), then SGLang's
own disk reload of A, each serving exactly what a fresh server started on those files serves (SGLang's
``/weights_checker`` checksums and greedy output). The reference is SGLang's first load of the files in the same
CPU environment, without the plugin's hooks (``SGLANG_PLUGINS`` names only the CPU environment's plugin). Without
the plugin, SGLang's own reload of an FP8 model kills the server (the post-processed fused qkv / gate_up have no
``weight_loader``); here it is exact. Two ``--partial`` pushes that together cover B serve B; one that would write
part of a quantized module (q_proj without k_proj and v_proj) is refused in words and changes nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer, generate_ids
from sglang_ckpt_plugin.demo.tiny_quantized import make_tiny_fp8_model

from .conftest import NEW_TOKENS, PROMPT, assert_closed, plugin_info, push

pytestmark = pytest.mark.slow
IDLE = ["--sleep-on-idle"]  # an idle CPU server otherwise polls a core that the others need


def served(url: str) -> tuple[str, list[int]]:
    evidence.wait_warmed_up(url)
    return evidence.checksum(url), generate_ids(url, PROMPT, NEW_TOKENS)["output_ids"]


def tensors_of(checkpoint: Path) -> dict:
    return {name: t for file in sorted(checkpoint.glob("*.safetensors")) for name, t in load_file(file).items()}


def subset(src: Path, dst: Path, keep) -> Path:
    """A copy of checkpoint ``src`` with only the tensors whose names ``keep`` accepts, in one file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v for k, v in tensors_of(src).items() if keep(k)}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def fp8(ckpt_root) -> dict[str, Path]:
    return {
        tag: make_tiny_fp8_model(ckpt_root / f"fp8_qwen3_{tag}", "qwen3", seed=20 + i) for i, tag in enumerate("ab")
    }


def reload_kills(plain: SGLangServer, checkpoint: Path) -> bool:
    """SGLang's own disk reload on a server without the plugin's hooks: True if the server died of it."""
    body = {"model_path": str(checkpoint), "load_format": "auto"}
    try:
        httpx.post(f"{plain.url}/update_weights_from_disk", json=body, timeout=60)
    except httpx.HTTPError:
        pass
    try:
        plain.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return True


def fresh(checkpoints: dict[str, Path], logs: Path, name: str, env=None, then=None, **server_kwargs) -> dict:
    """What a fresh server started on each checkpoint serves: SGLang's first load, without the plugin's hooks
    (``SGLANG_PLUGINS`` names the CPU environment's plugin and ``env``'s). ``then(tag, server)`` runs after."""
    out = {}
    extra = [*server_kwargs.pop("extra_args", []), *IDLE]
    for tag, checkpoint in checkpoints.items():
        env_all = {"SGLANG_PLUGINS": PLUGIN_FREE, **(env or {})}
        log = logs / f"{name}_{tag}.log"
        with SGLangServer(
            checkpoint, log, wait_for_weights=False, env=env_all, extra_args=extra, **server_kwargs
        ) as plain:
            plain.wait_healthy()
            assert "ckpt_plugin" not in httpx.get(f"{plain.url}/model_info", timeout=30).json()
            out[tag] = served(plain.url)
            if then is not None:
                then(tag, plain)
        assert plain.group_pids() == []
    assert out["a"] != out["b"], "the two checkpoints must serve differently"
    return out


def push_a_b_then_reload_a(url: str, checkpoints: dict[str, Path], reference: dict, *loader: str) -> None:
    """A pushed in two phases through the checkpoint's page cache, B streamed through shared-memory buckets, then
    SGLang's own disk reload of A: each serves what a fresh server on those files serves."""
    push(url, checkpoints["a"], *loader, "--weight-version", "a")
    assert served(url) == reference["a"]
    push(url, checkpoints["b"], *loader, "--two-phase", "off", "--transfer", "copy", "--weight-version", "b")
    assert served(url) == reference["b"]
    evidence.reload_from_disk(url, checkpoints["a"])  # SGLang's own path: without the plugin, the server dies here
    assert served(url) == reference["a"]


@pytest.fixture(scope="module")
def reference(fp8, tmp_path_factory) -> dict:
    """The fresh servers' answers for A and B; then the B server's own disk reload of A (``sglang_alone_reload``)."""
    outcome = {}

    def reload_a(tag: str, plain: SGLangServer) -> None:
        if tag == "b":
            outcome["sglang_alone_reload"] = "killed the server" if reload_kills(plain, fp8["a"]) else "served on"

    return {**fresh(fp8, tmp_path_factory.mktemp("logs"), "fp8_reference", then=reload_a), **outcome}


def test_without_the_plugin_sglangs_own_reload_of_an_fp8_model_kills_the_server(reference):
    """What the plugin mends (README, docs/models.md): SGLang 0.5.23 reloading a block-FP8 model into post-processed
    modules raises AttributeError on the fused qkv_proj, its rollback raises the same, and every process exits."""
    assert reference["sglang_alone_reload"] == "killed the server"


@pytest.fixture(scope="module")
def server(fp8, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "fp8_server.log"
    with SGLangServer(fp8["a"], log, extra_args=IDLE) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == []


def test_pushes_and_sglangs_own_reload_serve_what_a_fresh_server_serves(server, fp8, reference):
    assert_closed(server.url)
    push_a_b_then_reload_a(server.url, fp8, reference)
    assert plugin_info(server.url)["weights_loaded"] is True


def test_partial_pushes_write_whole_quantized_modules_or_are_refused(server, fp8, reference, tmp_path):
    evidence.reload_from_disk(server.url, fp8["a"])
    before = served(server.url)
    assert before == reference["a"]
    layer0 = re.compile(r"^model\.layers\.0\.")
    first = subset(fp8["b"], tmp_path / "b_layer0", lambda name: bool(layer0.search(name)))
    rest = subset(fp8["b"], tmp_path / "b_rest", lambda name: not layer0.search(name))
    split = subset(fp8["b"], tmp_path / "b_q_only", lambda name: ".self_attn.q_proj." in name)

    proc = push(server.url, split, "--partial", check=False)
    assert proc.returncode != 0
    assert "writes part of 2 quantized module(s)" in proc.stderr, proc.stderr[-2000:]
    assert "self_attn.qkv_proj" in proc.stderr
    assert served(server.url) == before  # nothing written

    push(server.url, first, "--partial", "--weight-version", "fp8-b-layer0")
    push(server.url, rest, "--partial", "--weight-version", "fp8-b-rest")
    assert served(server.url) == reference["b"]


@pytest.mark.parametrize("pusher", ["TrainerPush", "LocalPush"])
def test_a_trainers_push_serves_what_a_fresh_server_serves(server, fp8, reference, pusher):
    """TrainerPush: SGLang's weight-update session (begin, buckets over its group, end), buckets small enough that
    a quantized module's tensors travel in different buckets: each is restored when its first tensor arrives and
    post-processed once, at the session's end. LocalPush: the loader's receive session, bucket by bucket."""
    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    evidence.reload_from_disk(server.url, fp8["a"])
    tensors = tensors_of(fp8["b"])
    if pusher == "TrainerPush":
        with TrainerPush(server.url, timeout_s=120, bucket_bytes=200_000) as trainer:
            stats = trainer.push(tensors.items(), weight_version="trainer-b")
        assert stats.buckets > 5
    else:
        with LocalPush(server.url, bucket_bytes=200_000) as local:
            local.push(tensors.items(), weight_version="local-b")
    assert plugin_info(server.url)["weights_state"] == "complete"
    assert served(server.url) == reference["b"]


def test_bf16_pushes_into_an_online_fp8_server_are_requantized_on_every_update(fp8, tmp_path_factory):
    """FP8 rollout for RL: the server quantizes a bfloat16 model online (``--quantization fp8``); the trainer pushes
    what it holds (bfloat16: the CLI, then TrainerPush and LocalPush), and every update is quantized anew, equal to a
    fresh ``--quantization fp8`` server on the same bfloat16 files."""
    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    floats = {tag: ck.with_name(ck.name + "-float") for tag, ck in fp8.items()}  # what the FP8 ones were made from
    online = ["--quantization", "fp8"]
    logs = tmp_path_factory.mktemp("logs")
    reference = fresh(floats, logs, "online_reference", extra_args=online)
    with SGLangServer(floats["a"], logs / "online_server.log", extra_args=[*online, *IDLE]) as srv:
        srv.wait_listening()
        push_a_b_then_reload_a(srv.url, floats, reference)
        with TrainerPush(srv.url, timeout_s=120, bucket_bytes=200_000) as trainer:  # a trainer's bfloat16 tensors
            trainer.push(tensors_of(floats["b"]).items(), weight_version="trainer-b")
        assert served(srv.url) == reference["b"]
        with LocalPush(srv.url, bucket_bytes=200_000) as local:
            local.push(tensors_of(floats["a"]).items(), weight_version="local-a")
        assert served(srv.url) == reference["a"]
    assert srv.group_pids() == []


def test_an_fp8_moe_server_at_tp2_takes_a_b_and_sglangs_reload_exactly(ckpt_root, fault_dir, tmp_path_factory):
    """Block-FP8 Qwen3-MoE at ``--tp 2`` (each rank packs its half of every projection and of every expert): pushes
    of A and B, then SGLang's own reload of A, each equal to a fresh TP=2 server on those files. SGLang alone cannot
    start ``--tp 2`` on a CPU, so the references load the test-only plugin that turns pynccl off
    (``ckpt_test_gloo_tp``) beside the CPU environment's."""
    from sglang_ckpt_plugin.cpu_env import core_binds

    from .conftest import fault_plugin_env

    moe = {t: make_tiny_fp8_model(ckpt_root / f"fp8_moe_{t}", "qwen3_moe", seed=40 + i) for i, t in enumerate("ab")}
    logs = tmp_path_factory.mktemp("logs")
    env = {
        **fault_plugin_env(fault_dir),
        "SGLANG_PLUGINS": f"{PLUGIN_FREE},ckpt_test_gloo_tp",
        "SGLANG_CPU_OMP_THREADS_BIND": core_binds(2),
    }
    reference = fresh(moe, logs, "moe_tp2_reference", env=env, tp_size=2)
    with SGLangServer(moe["a"], logs / "moe_tp2_server.log", tp_size=2, extra_args=IDLE) as srv:
        srv.wait_listening()
        push_a_b_then_reload_a(srv.url, moe, reference, "--inference-parallel-size", "2")
    assert srv.group_pids() == []


def test_an_fp8_deepseek_v3_server_takes_a_b_and_sglangs_reload_exactly(ckpt_root, tmp_path_factory):
    """Block-FP8 DeepSeek-V3 (the spec's model in small: MLA with the fused ``q_a_proj`` + ``kv_a_proj_with_mqa``,
    ``w_kc``/``w_vc`` derived from ``kv_b_proj``, MoE with a shared expert): pushes of A and B, then SGLang's own
    reload of A, each equal to a fresh server on those files."""
    mla = {t: make_tiny_fp8_model(ckpt_root / f"fp8_dsv3_{t}", "deepseek_v3", seed=60 + i) for i, t in enumerate("ab")}
    logs = tmp_path_factory.mktemp("logs")
    reference = fresh(mla, logs, "dsv3_reference")
    with SGLangServer(mla["a"], logs / "dsv3_server.log", extra_args=IDLE) as srv:
        srv.wait_listening()
        push_a_b_then_reload_a(srv.url, mla, reference)
    assert srv.group_pids() == []
