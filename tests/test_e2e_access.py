"""Who may push: a server without the plugin is named as such; API keys are honoured like SGLang's routes."""

from __future__ import annotations

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer

from .conftest import assert_serves, push

pytestmark = pytest.mark.slow


def test_server_without_plugin_gets_a_clear_error(llama_a, tmp_path):
    # SGLANG_PLUGINS is SGLang's allow-list: naming only another plugin leaves ours out
    with SGLangServer(
        llama_a, tmp_path / "noplugin.log", wait_for_weights=False, env={"SGLANG_PLUGINS": PLUGIN_FREE}
    ) as srv:
        srv.wait_healthy()
        proc = push(srv.url, llama_a, check=False)
        assert proc.returncode == 1
        assert "without sglang-ckpt-plugin" in proc.stderr and "pip install" in proc.stderr


def test_admin_api_key_is_required_for_the_push(llama_a, tmp_path):
    with SGLangServer(llama_a, tmp_path / "apikey.log", extra_args=["--admin-api-key", "s3cret"]) as srv:
        srv.wait_listening()
        body = {"zmq_handles": {"cpu-tp0": "ipc:///nowhere.sock"}}
        assert httpx.post(f"{srv.url}/update_weights_from_ipc", json=body).status_code == 401
        # routes the plugin wraps keep SGLang's auth level (SGLang's tensor route unpickles its body)
        for path in (
            "/update_weights_from_tensor",
            "/begin_weight_update",
            "/end_weight_update",
            "/update_weights_from_disk",
            "/weights_checker",
        ):
            assert httpx.post(f"{srv.url}{path}", json={}).status_code == 401, path
        no_key = push(srv.url, llama_a, check=False)
        assert no_key.returncode == 1 and "--api-key" in no_key.stderr
        push(srv.url, llama_a, "--api-key", "s3cret")
        assert_serves(srv.url, llama_a, headers={"Authorization": "Bearer s3cret"})


def test_api_key_travels_by_environment_to_the_loader_and_its_torchrun_ranks(llama_a, llama_b, tmp_path):
    """A keyed TP=2 server, key given only in the environment: the one loader process that feeds both CPU ranks
    authenticates, and so do the two torchrun ranks the loader relaunches itself as for a GPU server (driven here
    through the same relaunch function); no process's command line carries the key."""
    import os
    import subprocess
    import sys
    import time

    def run_watching_cmdlines(cmd: list[str], env: dict) -> list[bytes]:
        loader = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cmdlines = []
        while loader.poll() is None:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        cmdlines.append(open(f"/proc/{entry}/cmdline", "rb").read())
                    except OSError:
                        pass
            time.sleep(0.2)
        out, err = loader.communicate()
        assert loader.returncode == 0, err[-3000:]
        assert not any(b"s3cret" in c and b"sglang_ckpt_plugin" in c for c in cmdlines)
        return cmdlines

    with SGLangServer(llama_a, tmp_path / "apikey2.log", tp_size=2, extra_args=["--admin-api-key", "s3cret"]) as srv:
        srv.wait_listening()
        env = {**os.environ, "SGLANG_CKPT_API_KEY": "s3cret"}

        def loader_args(checkpoint) -> list[str]:
            return [
                "--checkpoint-path",
                str(checkpoint),
                "--endpoint",
                srv.url,
                "--inference-parallel-size",
                "2",
                "--quiet",
                "--timeout",
                "120",
                "--sleep-time",
                "3",
            ]

        args = loader_args(llama_a)
        cmdlines = run_watching_cmdlines([sys.executable, "-m", "sglang_ckpt_plugin.update", *args], env)
        assert not any(b"torch.distributed.run" in c for c in cmdlines)  # a CPU server: one process feeds both
        assert_serves(srv.url, llama_a, headers={"Authorization": "Bearer s3cret"})

        relaunch = (
            "import sys; from sglang_ckpt_plugin.loader.cli import parse_args, relaunch_under_torchrun; "
            "relaunch_under_torchrun(parse_args(sys.argv[1:]), sys.argv[1:])"
        )
        args = loader_args(llama_b)  # the other checkpoint: the torchrun ranks' push must change what is served
        cmdlines = run_watching_cmdlines([sys.executable, "-c", relaunch, *args], env)
        assert any(b"torch.distributed.run" in c and b"sglang_ckpt_plugin.update" in c for c in cmdlines)
        assert_serves(srv.url, llama_b, headers={"Authorization": "Bearer s3cret"})
