"""More real-server cases: another architecture under SGLang's own flag name, and the start-up timeout."""

from __future__ import annotations

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids
from sglang_ckpt_plugin.server.gate import EXIT_NO_WEIGHTS

from .conftest import NEW_TOKENS, PROMPT, hf_reference, our_leftovers, push

pytestmark = pytest.mark.slow


def test_qwen3_under_sglang_flag_name_equals_hf(qwen3_a, tmp_path):
    with SGLangServer(qwen3_a, tmp_path / "qwen3.log", wait_flag="--checkpoint-engine-wait-weights-before-ready") as srv:
        srv.wait_listening()
        assert httpx.post(f"{srv.url}/generate", json={"text": "w5"}).status_code == 503
        before = set(our_leftovers())
        push(srv.url, qwen3_a, "--weight-version", "q-1", "--num-buffers", "3")
        assert set(our_leftovers()) - before == set()
        result = generate_ids(srv.url, PROMPT, NEW_TOKENS)
        assert result["output_ids"] == hf_reference(str(qwen3_a))
        assert result["meta_info"]["weight_version"] == "q-1"
    assert srv.group_pids() == []


def test_no_weights_within_timeout_exits_nonzero(llama_a, tmp_path):
    srv = SGLangServer(llama_a, tmp_path / "timeout.log", extra_args=["--initial-weights-timeout", "3"])
    with srv:
        srv.wait_listening()
        assert httpx.get(f"{srv.url}/health").status_code == 503
        code = srv.proc.wait(timeout=60)
    assert code != 0
    assert "no weights arrived within --initial-weights-timeout 3 s" in srv.log_path.read_text()
    assert srv.group_pids() == []
    assert f"exiting with code {EXIT_NO_WEIGHTS}" in srv.log_path.read_text()
