"""Who may push: a server without the plugin is named as such; API keys are honoured like SGLang's routes."""

from __future__ import annotations

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer

from .conftest import NEW_TOKENS, PROMPT, hf_reference, push

pytestmark = pytest.mark.slow


def test_server_without_plugin_gets_a_clear_error(llama_a, tmp_path):
    # SGLANG_PLUGINS is SGLang's allow-list: naming only another plugin leaves ours out
    with SGLangServer(llama_a, tmp_path / "noplugin.log", wait_for_weights=False,
                      env={"SGLANG_PLUGINS": "smg-servicer"}) as srv:  # fmt: skip
        srv.wait_healthy()
        proc = push(srv.url, llama_a, check=False)
        assert proc.returncode == 1
        assert "without sglang-ckpt-plugin" in proc.stderr and "pip install" in proc.stderr


def test_admin_api_key_is_required_for_the_push(llama_a, tmp_path):
    with SGLangServer(llama_a, tmp_path / "apikey.log", extra_args=["--admin-api-key", "s3cret"]) as srv:
        srv.wait_listening()
        body = {"zmq_handles": {"cpu-tp0": "ipc:///nowhere.sock"}}
        assert httpx.post(f"{srv.url}/update_weights_from_ipc", json=body).status_code == 401
        no_key = push(srv.url, llama_a, check=False)
        assert no_key.returncode == 1 and "--api-key" in no_key.stderr
        push(srv.url, llama_a, "--api-key", "s3cret")
        resp = httpx.post(f"{srv.url}/generate", timeout=60,
                          json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}})  # fmt: skip
        assert resp.json()["output_ids"] == hf_reference(str(llama_a))
