"""Mixture-of-experts models on a real SGLang server (tiny Qwen3-MoE and Mixtral, 4 experts per layer, fused by
SGLang into one w13/w2 parameter per layer): a push that lacks experts never opens the gate, with or without
``--partial``; a full push is bit-exact against SGLang's own disk reload; SGLang's own disk reload of a
checkpoint that does not fit the model is refused and the server keeps serving; one SGLang itself loads (a
checkpoint lacking experts: it writes what the files hold) goes through. ``LocalPush`` of a live transformers 5
model, experts stacked as it holds them, serves what SGLang's reload of its files serves (Qwen3-MoE) or is refused
naming a tensor (Mixtral, whose names transformers also changes)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer, generate_ids
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

from .conftest import NEW_TOKENS, PROMPT, assert_closed, assert_serves, push, serve_other
from .test_e2e_faults import info

pytestmark = pytest.mark.slow
LACKING = re.compile(r"\.experts\.[123]\.")  # every tensor of experts 1-3 (w1, w2, w3 / gate, up, down)


def without(src: Path, dst: Path, drop: re.Pattern) -> Path:
    """A copy of checkpoint ``src`` without the tensors whose names match ``drop``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if not drop.search(k)}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, ckpt_root, tmp_path_factory):
    arch = request.param
    full = make_tiny_model(ckpt_root / f"{arch}_full", arch, seed=3, dtype=torch.float32)
    lacking = without(full, ckpt_root / f"{arch}_lacking", LACKING)
    log = tmp_path_factory.mktemp("logs") / f"{arch}_server.log"
    with SGLangServer(full, log) as srv:
        srv.wait_listening()
        yield arch, srv, full, lacking
    assert srv.group_pids() == []


def test_a_push_lacking_experts_keeps_the_gate_shut_then_a_full_push_is_bit_exact(moe):
    arch, srv, full, lacking = moe
    proc = push(srv.url, lacking, "--weight-version", "lacking", check=False)
    assert proc.returncode != 0
    assert re.search(
        r"does not cover \d+ parameter.*experts\.w13_weight \(unwritten: dim-0 index 1-3 of 4\)", proc.stderr
    )
    assert_closed(srv.url)

    push(srv.url, lacking, "--partial", "--weight-version", "lacking-partial")  # accepted, as a partial update
    missing = assert_closed(srv.url)["ckpt_plugin"]["missing"]
    assert any(re.search(r"experts\.w13_weight \(unwritten: dim-0 index 1-3 of 4\)", m) for m in missing), missing
    assert any(re.search(r"experts\.w2_weight \(unwritten: dim-0 index 1-3 of 4\)", m) for m in missing), missing

    push(srv.url, full, "--weight-version", f"{arch}-full")
    srv.wait_healthy(timeout_s=60)
    assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == f"{arch}-full"
    pushed = evidence.checksum(srv.url), generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"]
    assert_serves(srv.url, full)
    if arch == "qwen3_moe":  # once for the MoE class: SGLang without the plugin on the same files, untouched by it
        log = srv.log_path.with_name(f"{arch}_plain.log")
        with SGLangServer(full, log, wait_for_weights=False, env={"SGLANG_PLUGINS": PLUGIN_FREE}) as plain:
            plain.wait_healthy()
            assert "ckpt_plugin" not in info(plain.url)
            assert (evidence.checksum(plain.url), generate_ids(plain.url, PROMPT, NEW_TOKENS)["output_ids"]) == pushed
        assert plain.group_pids() == []


def test_sglang_disk_reload_of_a_checkpoint_that_does_not_fit_is_refused_and_the_server_lives(moe, ckpt_root):
    """SGLang alone would load part of it, fail, reload the same files to "roll back", fail again and exit. A
    checkpoint it loads without failing (one lacking experts) is SGLang's to load: the plugin lets it through."""
    arch, srv, full, lacking = moe
    push(srv.url, full, "--weight-version", "served")
    srv.wait_healthy(timeout_s=60)
    served = evidence.checksum(srv.url)
    ids = generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"]
    other_size = ckpt_root / f"{arch}_hidden32"
    if not other_size.exists():
        make_tiny_model(other_size, arch, seed=4, hidden=32, dtype=torch.float32)
    for bad, why in ((other_size, r"does not fit|shape mismatch"),):
        body = {"model_path": str(bad), "load_format": "auto"}
        resp = httpx.post(f"{srv.url}/update_weights_from_disk", json=body, timeout=300)
        body = resp.json()
        assert body["success"] is False and re.search(why, body["message"]), body
        assert "the served weights are unchanged" in body["message"]
        state = info(srv.url)
        assert state["weights_loaded"] is True and state["weight_version"] == "served"
        assert state["ckpt_plugin"]["last_update"]["outcome"] == "rejected"
        assert evidence.checksum(srv.url) == served
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == ids
    assert srv.proc.poll() is None
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    other = ckpt_root / f"{arch}_other_lacking"  # other weights than those served, so the reload shows
    if not other.exists():
        without(make_tiny_model(ckpt_root / f"{arch}_other", arch, seed=5, dtype=torch.float32), other, LACKING)
    resp = httpx.post(
        f"{srv.url}/update_weights_from_disk", json={"model_path": str(other), "load_format": "auto"}, timeout=300
    )
    assert resp.status_code == 200 and resp.json()["success"] is True, resp.text
    assert info(srv.url)["ckpt_plugin"]["last_update"]["outcome"] == "success"
    assert evidence.checksum(srv.url) != served  # expert 0 and the rest of the model came from the files


def test_a_trainer_pushes_its_experts_as_transformers_holds_them(moe, ckpt_root):
    """transformers 5 holds each layer's experts as one ``gate_up_proj`` and one ``down_proj`` tensor; SGLang's
    loaders take one tensor per expert and projection. A ``LocalPush`` of ``named_parameters()`` serves what
    SGLang's own reload of the files the trainer loaded serves; Mixtral's trainer names (``mlp`` for the files'
    ``block_sparse_moe``) are refused by name and the served weights stay."""
    from transformers import AutoModelForCausalLM

    from sglang_ckpt_plugin.loader.push import PushError
    from sglang_ckpt_plugin.local_push import LocalPush

    arch, srv, full, _ = moe
    trained = ckpt_root / f"{arch}_trained"
    if not trained.exists():
        make_tiny_model(trained, arch, seed=6, dtype=torch.float32)
    named = [(n, p.detach()) for n, p in AutoModelForCausalLM.from_pretrained(trained).named_parameters()]
    assert any(n.endswith("mlp.experts.gate_up_proj") and p.dim() == 3 for n, p in named), [n for n, _ in named]
    served = serve_other(srv.url, full)
    ids = generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"]
    with LocalPush(srv.url, bucket_bytes=200_000) as local:
        if arch == "mixtral":
            with pytest.raises(PushError, match="weights? of this model") as refused:
                local.push(named, weight_version="trainer")
            assert re.search(r"'model\.layers\.\d+\.mlp\.", str(refused.value)), refused.value  # as sent
            assert evidence.checksum(srv.url) == served
            assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == ids
            return
        local.push(named, weight_version="trainer")
    pushed = evidence.checksum(srv.url), generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"]
    assert pushed[0] != served, "the push did not change what is served"
    assert serve_other(srv.url, trained) == pushed[0]
    assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] == pushed[1]
