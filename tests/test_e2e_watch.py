"""The resident loader (``--watch DIR``) against a real SGLang server that starts on dummy weights: checkpoints
written into the watched directory one after another, each served bit-exact against SGLang's own disk reload; a
refused one skipped while the server keeps serving; a slow writer whose half-written checkpoint is never pushed;
the server killed and restarted on dummy weights, refilled by the loader; SIGTERM in the middle of a push ends
the loader cleanly, the server keeping what it served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids
from sglang_ckpt_plugin.loader.reader import READ_RATE_ENV
from sglang_ckpt_plugin.loader.watch_dir import incomplete_reason

from .conftest import NEW_TOKENS, PROMPT, assert_serves, our_leftovers
from .test_e2e_faults import _variant
from .test_e2e_two_phase import dropped_or_never_staged
from .test_watch_dir import copy_slowly_in_parts

pytestmark = pytest.mark.slow


def start_watch(url: str, watched, status, log) -> subprocess.Popen:
    """Through shared bucket buffers, each read held to 1 MB/s: a push of the tiny model lasts about a second, long
    enough to be interrupted in the middle."""
    cmd = [
        sys.executable,
        "-m",
        "sglang_ckpt_plugin.update",
        "--watch",
        str(watched),
        "--endpoint",
        url,
        "--status-file",
        str(status),
        "--poll-s",
        "0.2",
        "--quiet",
        "--timeout",
        "120",
        "--transfer",
        "copy",
        "--bucket-size",
        "300K",
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, READ_RATE_ENV: "1M"})


def served_info(url: str) -> dict:
    return httpx.get(f"{url}/model_info", timeout=30).json()


def served(url: str) -> tuple:
    info = served_info(url)
    return info.get("weight_version"), info["ckpt_plugin"]["weights_state"], info["ckpt_plugin"]["last_update"]


def wait_for(check, what: str, loader: subprocess.Popen, log, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        assert loader.poll() is None, f"the resident loader exited ({loader.returncode}):\n{log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout_s:g} s; loader output:\n{log.read_text()}")


def serves_version(url: str, version: str):
    return lambda: served(url)[:2] == (version, "complete")


def test_resident_loader_follows_a_watched_directory_and_refills_a_restarted_server(llama_a, llama_b, tmp_path):
    watched, status, log = tmp_path / "ckpts", tmp_path / "status.json", tmp_path / "loader.log"
    watched.mkdir()
    before = set(our_leftovers())
    server = SGLangServer(llama_a, tmp_path / "server.log").start()
    loader = None
    try:
        server.wait_listening()
        with open(log, "w") as out:
            loader = start_watch(server.url, watched, status, out)
        status_of = lambda: json.loads(status.read_text()) if status.exists() else {}  # noqa: E731

        # three checkpoints in a row, each served exactly
        shutil.copytree(llama_a, watched / "step-1")
        wait_for(serves_version(server.url, "step-1"), "serving step-1", loader, log)
        assert_serves(server.url, llama_a)
        shutil.copytree(llama_b, watched / "step-2")
        wait_for(serves_version(server.url, "step-2"), "serving step-2", loader, log)
        assert_serves(server.url, llama_b)

        # a checkpoint the server refuses: skipped with the reason, step-2 still served
        _variant(
            llama_a,
            watched / "step-3",
            lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": t["model.norm.weight"].clone()},
        )
        skipped = wait_for(lambda: status_of().get("skipped"), "skipping step-3", loader, log)
        assert skipped[0]["path"].endswith("step-3") and "extra_proj" in skipped[0]["reason"], skipped
        assert served(server.url)[:2] == ("step-2", "complete")
        assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "step-2"

        # a slow writer (of the checkpoint not served: a push of a half-written prefix would show): nothing is
        # pushed until every shard is whole
        last = served(server.url)[2]
        for _ in copy_slowly_in_parts(llama_a, watched / "step-4"):
            time.sleep(0.3)  # longer than a scan: the loader sees every intermediate state, twice
            if incomplete_reason(watched / "step-4") is not None:  # a shard still missing or cut short
                assert served(server.url)[2] == last, "a half-written checkpoint reached the server"
        wait_for(serves_version(server.url, "step-4"), "serving step-4", loader, log)
        assert [s["path"] for s in status_of()["skipped"]] == [skipped[0]["path"]]
        assert_serves(server.url, llama_a)

        # the server dies and comes back on dummy weights: the loader refills it with what it served
        server.stop()
        server = SGLangServer(llama_a, tmp_path / "server2.log", port=server.port).start()
        server.wait_listening()
        wait_for(serves_version(server.url, "step-4"), "refilling the restarted server", loader, log)
        assert "refilled" in log.read_text() and "after this loader first saw its /model_info answer" in log.read_text()
        assert status_of()["instances"][0]["last_refill_s"] is not None
        assert_serves(server.url, llama_a)

        # SIGTERM in the middle of a push: the update is called off, the server keeps step-4, nothing left behind
        staged_before = served_info(server.url)["ckpt_plugin"]["staging"]["update_id"]
        shutil.copytree(llama_b, watched / "step-5")
        wait_for(
            lambda: (status_of().get("in_progress") or {}).get("version") == "step-5", "pushing step-5", loader, log
        )
        loader.send_signal(signal.SIGTERM)
        assert loader.wait(timeout=60) == 0, log.read_text()
        assert "stopped" in log.read_text() and status_of()["stopped"] is True
        assert status_of()["instances"][0]["weight_version"] == "step-4"
        assert set(our_leftovers()) - before == set()
        doc = served_info(server.url)
        assert (doc["weight_version"], doc["ckpt_plugin"]["weights_state"]) == ("step-4", "complete")
        assert dropped_or_never_staged(doc["ckpt_plugin"]["staging"], staged_before), doc["ckpt_plugin"]["staging"]
        assert_serves(server.url, llama_a)
    finally:
        if loader is not None and loader.poll() is None:
            loader.kill()
            loader.wait()
        server.stop()
    assert server.group_pids() == []
