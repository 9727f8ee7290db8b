"""A real SGLang server started with dummy weights and --wait-for-initial-weights; the loader pushes."""

from __future__ import annotations

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids

from .conftest import NEW_TOKENS, PROMPT, hf_reference, our_leftovers, push

pytestmark = pytest.mark.slow

MODEL_ROUTES = [
    ("POST", "/generate", {"text": "w5 w6", "sampling_params": {"max_new_tokens": 2}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "w5 w6", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}),
    ("GET", "/health", None),
    ("GET", "/health_generate", None),
]


@pytest.fixture(scope="module")
def server(llama_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "llama_server.log"
    with SGLangServer(llama_a, log) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


def test_gate_refuses_everything_that_runs_the_model(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, body in MODEL_ROUTES:
            resp = c.request(method, path, json=body)
            assert resp.status_code == 503, (path, resp.status_code, resp.text[:200])
            assert "weights have not been loaded" in resp.json()["message"], path
            assert "sglang_ckpt_plugin.update" in resp.json()["message"], path
        info = c.get("/model_info").json()
    assert info["weights_loaded"] is False
    assert info["ckpt_plugin"]["wait_for_initial_weights"] is True


def test_push_makes_output_equal_hf(server, llama_a):
    before = set(our_leftovers())
    out = push(server.url, llama_a, "--weight-version", "a-1")
    assert "pushed" in out.stdout and "stages: read" in out.stdout
    assert set(our_leftovers()) - before == set()
    server.wait_healthy(timeout_s=60)
    result = generate_ids(server.url, PROMPT, NEW_TOKENS)
    assert result["output_ids"] == hf_reference(str(llama_a))
    assert result["meta_info"]["weight_version"] == "a-1"
    info = httpx.get(f"{server.url}/model_info").json()
    assert info["weights_loaded"] is True and info["weight_version"] == "a-1"
    assert info["ckpt_plugin"]["last_update"]["success"] is True
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for method, path, body in MODEL_ROUTES:
            assert c.request(method, path, json=body).status_code == 200, path


def test_second_push_of_sharded_checkpoint_switches_output(server, llama_a, llama_b):
    assert hf_reference(str(llama_a)) != hf_reference(str(llama_b))
    before = set(our_leftovers())
    push(server.url, llama_b, "--weight-version", "b-1", "--bucket-size", "300K")  # several buckets, 2 in flight
    assert set(our_leftovers()) - before == set()
    result = generate_ids(server.url, PROMPT, NEW_TOKENS)
    assert result["output_ids"] == hf_reference(str(llama_b))
    assert result["meta_info"]["weight_version"] == "b-1"
    assert httpx.get(f"{server.url}/model_info").json()["weight_version"] == "b-1"


def test_verified_push_reports_the_fingerprint_of_the_files_on_disk(server, llama_a):
    from .test_transport import disk_fingerprint

    out = push(server.url, llama_a, "--weight-version", "a-verified", "--verify")
    loader_fp = out.stdout.split("fingerprint=")[1].split()[0]
    info = httpx.get(f"{server.url}/model_info").json()
    assert info["ckpt_plugin"]["fingerprint"] == loader_fp == disk_fingerprint(llama_a)
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["output_ids"] == hf_reference(str(llama_a))
