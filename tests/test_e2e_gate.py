"""More real-server cases: another architecture under SGLang's own flag name, and the start-up timeout."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port, generate_ids
from sglang_ckpt_plugin.server.gate import EXIT_NO_WEIGHTS

from .conftest import NEW_TOKENS, PROMPT, assert_serves, communicate_or_dump, our_leftovers, push

pytestmark = pytest.mark.slow


def test_qwen3_under_sglang_flag_name_serves_the_checkpoint(qwen3_a, tmp_path):
    with SGLangServer(
        qwen3_a, tmp_path / "qwen3.log", wait_flag="--checkpoint-engine-wait-weights-before-ready"
    ) as srv:
        srv.wait_listening()
        assert httpx.post(f"{srv.url}/generate", json={"text": "w5"}).status_code == 503
        before = set(our_leftovers())
        push(srv.url, qwen3_a, "--weight-version", "q-1", "--num-buffers", "3")
        assert set(our_leftovers()) - before == set()
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "q-1"
        assert_serves(srv.url, qwen3_a)
    assert srv.group_pids() == []


def test_sglang_serve_carries_the_plugin_like_launch_server(llama_a, tmp_path):
    """``sglang serve`` (SGLang's recommended command) loads the plugin: the gate, then a push served bit-exactly."""
    with SGLangServer(llama_a, tmp_path / "serve.log", launcher="serve") as srv:
        assert srv.args[1] == "serve"
        srv.wait_listening()
        assert httpx.get(f"{srv.url}/health").status_code == 503
        assert httpx.post(f"{srv.url}/generate", json={"text": "w5"}).status_code == 503
        push(srv.url, llama_a, "--weight-version", "serve-1")
        srv.wait_healthy(timeout_s=60)
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "serve-1"
        assert_serves(srv.url, llama_a)
    assert srv.group_pids() == []


def test_server_whose_port_is_taken_exits_instead_of_waiting_for_weights(llama_a, tmp_path):
    """SGLang joins the thread that waits for weights when its HTTP server stops (here: the port is taken). That
    wait must end, so the server exits non-zero at once and leaves nothing behind."""
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        srv = SGLangServer(llama_a, tmp_path / "taken.log", port=blocker.getsockname()[1])
        with srv:
            code = srv.proc.wait(timeout=180)
    assert code != 0
    log = srv.log_path.read_text()
    assert "address already in use" in log and "stopped before any weights arrived" in log
    assert srv.group_pids() == []


def test_launcher_moves_to_another_port_when_its_port_was_taken(llama_a, tmp_path):
    """The tests' launcher: a port it picked and lost before the server bound it (the multi-node tests start two
    servers at once) means a restart on another port, not a test that waits out its timeout."""
    import socket

    srv = SGLangServer(llama_a, tmp_path / "moved.log")
    lost = srv.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", lost))
        blocker.listen(1)
        with srv:
            srv.wait_listening()
            assert srv.port != lost and httpx.get(f"{srv.url}/model_info").status_code == 200
    assert srv.group_pids() == []


def test_no_weights_within_timeout_exits_with_code_3(llama_a, tmp_path):
    srv = SGLangServer(llama_a, tmp_path / "timeout.log", extra_args=["--initial-weights-timeout", "3"])
    with srv:
        srv.wait_listening()
        assert httpx.get(f"{srv.url}/health").status_code == 503
        code = srv.proc.wait(timeout=60)
    assert code == EXIT_NO_WEIGHTS, f"the server exited with {code}, not the documented {EXIT_NO_WEIGHTS}"
    assert "no weights arrived within --initial-weights-timeout 3 s" in srv.log_path.read_text()
    assert srv.group_pids() == []
    assert f"exiting with code {EXIT_NO_WEIGHTS}" in srv.log_path.read_text()


def test_scheduler_guard_starts_closed_without_the_http_gate(llama_a):
    """sglang.Engine has no HTTP server, so only the scheduler guard stands between a request and weights
    that were never written: it refuses (with its own words) until a complete load, then lets requests run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sglang_ckpt_plugin.demo.launch import server_env
    from sglang_ckpt_plugin.server.tp_worker import INCOMPLETE_REFUSAL

    script = Path(__file__).with_name("engine_guard.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(llama_a)], env=server_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {d["step"]: d for d in map(json.loads, proc.stdout.splitlines())}
    assert INCOMPLETE_REFUSAL in steps["before"]["error"] and "output_ids" not in steps["before"]
    assert INCOMPLETE_REFUSAL in steps["tensor-partial"]["error"]  # the tensor path wrote one parameter of 15
    assert steps["reload"]["ok"] is True, steps["reload"]["messages"]
    assert len(steps["after"]["output_ids"]) == 4


def test_a_loader_started_before_the_server_reads_the_checkpoint_while_the_server_starts(llama_a, tmp_path):
    """The loader brings a cold checkpoint into the page cache before the server answers (nothing waits for the
    server's start to read), then pushes it: served bit-exactly, and the loader says when the server was ready."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from sglang_ckpt_plugin.loader.early_read import cached_bytes, drop_cached

    # a copy no process maps (pages mapped elsewhere, e.g. by this process's reference model, stay cached)
    llama_a = Path(shutil.copytree(llama_a, tmp_path / "cold-llama"))
    files = sorted(llama_a.glob("*.safetensors"))
    fds = [os.open(f, os.O_RDONLY) for f in files]
    sizes = [os.fstat(fd).st_size for fd in fds]
    try:
        if any(drop_cached(str(f)) for f in files):
            pytest.skip("this filesystem keeps the checkpoint cached after POSIX_FADV_DONTNEED (tmpfs?)")
        srv = SGLangServer(llama_a, tmp_path / "late.log", port=free_port())
        cmd = [
            sys.executable,
            "-m",
            "sglang_ckpt_plugin.update",
            "--checkpoint-path",
            str(llama_a),
            "--endpoint",
            srv.url,
            "--quiet",
            "--timeout",
            "240",
            "--weight-version",
            "early-1",
        ]
        loader = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while any(cached_bytes(fd, 0, n) < n - 4096 for fd, n in zip(fds, sizes)):  # headers aside: data pages
                assert loader.poll() is None and time.monotonic() < deadline, "the loader did not read ahead"
                time.sleep(0.1)
            with srv:
                srv.wait_listening()
                out, err = communicate_or_dump(loader, 240, "loader started before its server")
                assert loader.returncode == 0, err
                assert "while waiting for the server: read" in err
                assert "[sglang-ckpt] ready: the server serves these weights" in out
                srv.wait_healthy(timeout_s=60)
                assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "early-1"
                assert_serves(srv.url, llama_a)
        finally:
            if loader.poll() is None:
                loader.kill()
                loader.wait()
    finally:
        for fd in fds:
            os.close(fd)
    assert srv.group_pids() == []


def test_a_port_sglang_finds_taken_at_start_counts_as_a_clash_the_launcher_moves_from():
    from sglang_ckpt_plugin.demo.launch import port_clash

    # SGLang 0.5.23's own check of the ports it derives (psutil named the server's own process as the holder)
    sglang = "[2026-12-07 01:39:16] Port is already in use. dist_init_port=49168 port_base=49169 detokenizer_port=49170"
    waited = (
        "ValueError: detokenizer_port at 49170 is not available in 30 seconds. detokenizer_port is used by a process"
    )
    waited += " already."
    assert port_clash(sglang) and port_clash(waited) and port_clash("OSError: [Errno 98] Address already in use")
    assert not port_clash("ValueError: tensor 'x' is not a weight of this model")
