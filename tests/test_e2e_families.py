"""Model families whose load_weights the old per-tensor check could not follow, on real SGLang servers:

- DeepSeek-V3's architecture (V3, R1, Kimi-K2): q-LoRA, whose ``q_a_proj`` and ``kv_a_proj_with_mqa`` SGLang fuses
  into one ``fused_qkv_a_proj_with_mqa`` only when both arrive in one ``load_weights`` call; MLA, MoE with a shared
  expert, ``noaux_tc`` routing, a multi-token-prediction layer in the checkpoint that the served model skips;
- Gemma-2, whose norms' loader is a method of the norm module (it writes ``self.weight`` and refreshes a derived
  ``gemma_weight`` buffer), with tied embeddings and sliding-window attention.

Each takes a refused push (the gate stays shut), two ``--partial`` pushes whose buckets split the fused pair, a
full ``--transfer copy`` push and SGLang's own disk reload; DeepSeek-V3 also at TP=2 from two torchrun loader
ranks. Evidence:
SGLang's checksums and greedy output after SGLang's own reload of the same files, and a server *without* the
plugin (``SGLANG_PLUGINS``) started on the files with ``--load-format auto``. (HF is no second opinion here:
SGLang's CPU MLA path and HF round these tiny models apart.) Every push changes what is served (A and B
alternate); the refused variants are derived from the checkpoint that is not being served.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer, free_port, generate_ids
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

from .conftest import NEW_TOKENS, PROMPT, assert_closed, push, run_with_stacks
from .test_e2e_faults import info

pytestmark = pytest.mark.slow

# the tensor each family's refused push lacks, and what the refusal must name
LACKS = {
    "deepseek_v3": ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", r"q_a_proj"),
    "gemma2": ("model.layers.1.post_feedforward_layernorm.weight", r"post_feedforward_layernorm"),
}
VOCAB = 256  # the embeddings (the largest tensor) fit a 64 KiB bucket
BUCKET = "64K"
FIRST_PART = re.compile(r"^model\.(embed_tokens|layers\.0\.)")  # the first --partial push; the second is the rest


@dataclass
class Family:
    arch: str
    a: Path
    b: Path
    plain_a: str  # checksum of A as a server without the plugin serves it
    plain_a_ids: list[int]


def tensors_of(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def variant(src: Path, dst: Path, keep) -> Path:
    """A copy of ``src`` (config, tokenizer) with the tensors ``keep(name)`` accepts. Files are read in name order
    and buckets packed in that order: every ``kv_a_proj_with_mqa`` goes first, every ``q_a_proj`` last, and the
    rest (more than a 64 KiB bucket) between them, so each pair is split across buckets."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    files: dict[str, dict] = {}
    for name, t in tensors_of(src).items():
        if keep(name):
            file = "0-kv_a" if "kv_a_proj_with_mqa" in name else "2-q_a" if "q_a_proj" in name else "1-rest"
            files.setdefault(file, {})[name] = t
    for file, tensors in files.items():
        save_file(tensors, dst / f"{file}.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=sorted(LACKS))
def family(request, ckpt_root, tmp_path_factory) -> Family:
    arch = request.param
    a = make_tiny_model(ckpt_root / f"{arch}_a", arch, seed=3, vocab=VOCAB)
    b = make_tiny_model(ckpt_root / f"{arch}_b", arch, seed=4, vocab=VOCAB)
    logs = tmp_path_factory.mktemp(f"{arch}_logs")
    plain = SGLangServer(
        a,
        logs / "plain.log",
        wait_for_weights=False,
        extra_args=["--sleep-on-idle"],
        env={"SGLANG_PLUGINS": PLUGIN_FREE},
    )
    with plain:
        plain.wait_healthy()
        assert "ckpt_plugin" not in info(plain.url)  # the reference runs without the plugin
        ids = generate_ids(plain.url, PROMPT, NEW_TOKENS)["output_ids"]
        ref = Family(arch, a, b, evidence.checksum(plain.url), ids)
    assert plain.group_pids() == []
    with SGLangServer(a, logs / "server.log", extra_args=["--sleep-on-idle"]) as srv:
        srv.wait_listening()
        yield ref, srv
    assert srv.group_pids() == []


def test_every_push_path_serves_what_sglang_itself_loads(family, tmp_path):
    ref, srv = family
    lacking_name, named = LACKS[ref.arch]

    # 1. a push lacking one tensor is refused and the never-filled server stays shut
    lacking = variant(ref.b, tmp_path / "lacking", lambda k: k != lacking_name)
    out = push(srv.url, lacking, "--weight-version", "lacking", check=False)
    assert out.returncode != 0 and re.search(named, out.stderr), out.stderr[-2000:]
    assert_closed(srv.url)
    if ref.arch == "deepseek_v3":  # its partner alone is unused; allowed, the fused parameter stays unwritten
        out = push(srv.url, lacking, "--allow-unused", check=False)
        assert out.returncode != 0 and "fused_qkv_a_proj_with_mqa" in out.stderr, out.stderr[-2000:]
        assert_closed(srv.url)

    # 2. two partial pushes, buckets of 64 KiB: q_a_proj and kv_a_proj_with_mqa of a layer travel apart
    first = variant(ref.b, tmp_path / "first", lambda k: bool(FIRST_PART.match(k)))
    rest = variant(ref.b, tmp_path / "rest", lambda k: not FIRST_PART.match(k))
    push(srv.url, first, "--partial", "--bucket-size", BUCKET, "--two-phase", "off", "--weight-version", "b-first")
    assert assert_closed(srv.url)["ckpt_plugin"]["missing_count"] > 0
    push(srv.url, rest, "--partial", "--bucket-size", BUCKET, "--weight-version", "b")
    srv.wait_healthy(timeout_s=60)
    served_b = evidence.checksum(srv.url)
    ids_b = generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"]
    evidence.reload_from_disk(srv.url, ref.b)  # SGLang's own reload of the same files: accepted, and equal
    assert evidence.checksum(srv.url) == served_b and served_b != ref.plain_a
    assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == ids_b

    # 3. the whole of A, copied into shared buckets: what a server without the plugin makes of A
    push(srv.url, ref.a, "--transfer", "copy", "--bucket-size", BUCKET, "--weight-version", "a")
    assert evidence.checksum(srv.url) == ref.plain_a
    out = generate_ids(srv.url, PROMPT, NEW_TOKENS)
    assert out["output_ids"] == ref.plain_a_ids and out["meta_info"]["weight_version"] == "a"

    # 4. SGLang's own disk reload of A goes through the plugin's guard and serves A
    resp = httpx.post(
        f"{srv.url}/update_weights_from_disk", json={"model_path": str(ref.a), "load_format": "auto"}, timeout=300
    )
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    assert evidence.checksum(srv.url) == ref.plain_a
    assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == ref.plain_a_ids
    assert info(srv.url)["weights_loaded"] is True


def test_deepseek_v3_at_tp2_from_two_torchrun_loader_ranks_loads_as_sglang_does(ckpt_root, tmp_path):
    """TP=2 (MLA heads and experts sharded, the fused q_a/kv_a projection replicated on both ranks): two loader
    ranks under torchrun with 64 KiB buckets that split every pair; both ranks bit-identical to SGLang's own
    reload of the same files on the same server, and the pushed checkpoint replaced the one served before."""
    a = make_tiny_model(ckpt_root / "deepseek_v3_a", "deepseek_v3", seed=3, vocab=VOCAB)
    b = make_tiny_model(ckpt_root / "deepseek_v3_b", "deepseek_v3", seed=4, vocab=VOCAB)
    split_b = variant(b, tmp_path / "split_b", lambda k: True)
    with SGLangServer(a, tmp_path / "tp2.log", tp_size=2, extra_args=["--sleep-on-idle"]) as srv:
        srv.wait_listening()
        push(srv.url, a, "--inference-parallel-size", "2", "--weight-version", "a")
        served_a = evidence.checksum(srv.url)
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
            str(split_b),
            "--endpoint",
            srv.url,
            "--inference-parallel-size",
            "2",
            "--quiet",
            "--timeout",
            "120",
            "--bucket-size",
            BUCKET,
            "--weight-version",
            "b",
        ]
        out = run_with_stacks(cmd, 300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "[sglang-ckpt rank 0] pushed" in out.stdout, out.stdout
        pushed = evidence.checksum(srv.url)
        ids = generate_ids(srv.url, PROMPT, NEW_TOKENS)
        assert ids["meta_info"]["weight_version"] == "b" and pushed != served_a
        evidence.reload_from_disk(srv.url, b)
        assert evidence.checksum(srv.url) == pushed
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == ids["output_ids"]
    assert srv.group_pids() == []
