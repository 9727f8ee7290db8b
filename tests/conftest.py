"""Shared fixtures: tiny checkpoints made locally, evidence from SGLang itself, push helper, leak checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A private socket directory for this test session (servers and loaders inherit it), so that leak checks
# see only this run's files.
os.environ["SGLANG_CKPT_SOCKET_DIR"] = tempfile.mkdtemp(prefix="sglang-ckpt-test-sockets-")

import pytest
import torch

from sglang_ckpt_plugin.demo import evidence
from sglang_ckpt_plugin.demo.processes import our_leftovers  # noqa: F401 (the tests import it from here)
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

PROMPT = [1, 5, 6, 7, 8, 9, 10]
NEW_TOKENS = 12


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def llama_a(ckpt_root) -> Path:
    return make_tiny_model(ckpt_root / "llama_a", "llama", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_b(ckpt_root) -> Path:
    """Same architecture, other weights, written as shards with a model.safetensors.index.json."""
    return make_tiny_model(ckpt_root / "llama_b", "llama", seed=1, dtype=torch.float32, max_shard_size="150KB")


@pytest.fixture(scope="session")
def qwen3_a(ckpt_root) -> Path:
    return make_tiny_model(ckpt_root / "qwen3_a", "qwen3", seed=2, dtype=torch.float32)


FAULT_PLUGIN_DIR = Path(__file__).with_name("server_faults")


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    """Where a test arms the test-only fault plugin (tests/server_faults) of a module's server."""
    return tmp_path_factory.mktemp("faults")


def fault_plugin_env(fault_dir: Path) -> dict[str, str]:
    """A server environment that loads the test-only fault plugin beside sglang-ckpt-plugin (SGLang finds it by its
    entry point on PYTHONPATH), armed by files in ``fault_dir``."""
    from sglang_ckpt_plugin.demo.launch import server_env

    repo = Path(__file__).resolve().parents[1]
    base = server_env("cpu").get("PYTHONPATH")  # the CPU environment's own entries (the sgl_kernel stand-in)
    path = os.pathsep.join(p for p in (str(FAULT_PLUGIN_DIR), str(repo), base) if p)
    return {"PYTHONPATH": path, "CKPT_TEST_FAULTS_DIR": str(fault_dir)}


def fault_server(model: Path, fault_dir: Path, tmp_path_factory, log_name: str, **server_kwargs):
    """A module's server (a generator for its fixture) carrying the test-only fault plugin; stopped at the end, with
    nothing of it left behind."""
    from sglang_ckpt_plugin.demo.launch import SGLangServer

    log = tmp_path_factory.mktemp("logs") / log_name
    with SGLangServer(model, log, env=fault_plugin_env(fault_dir), **server_kwargs) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


def plugin_info(url: str) -> dict:
    """The plugin's part of /model_info."""
    import httpx

    return httpx.get(f"{url}/model_info", timeout=30).json()["ckpt_plugin"]


def assert_serves(
    url: str, checkpoint: Path, headers: dict | None = None, hf_checkpoint: Path | None = None
) -> evidence.Evidence:
    """The server serves exactly ``checkpoint``: SGLang's checksums and greedy output equal those after SGLang's
    own disk reload of the same files, and HF (teacher-forced) agrees. Leaves the server on the disk reload.
    ``hf_checkpoint``: where this process finds the same files (a server on a cluster node sees its own disk)."""
    ev = evidence.gather(url, checkpoint, PROMPT, NEW_TOKENS, headers, hf_checkpoint)
    assert ev.ok, ev.verdict()
    return ev


def serve_other(url: str, checkpoint: Path, headers: dict | None = None) -> str:
    """Make the server serve ``checkpoint`` by SGLang's own disk reload (no push involved), so that the push a test
    makes next must change what is served; returns the checksum served now."""
    evidence.reload_from_disk(url, checkpoint, headers)
    return evidence.checksum(url, headers)


def assert_closed(url: str) -> dict:
    """The server has no complete weights: /model_info says so and generation answers 503."""
    import httpx

    state = httpx.get(f"{url}/model_info", timeout=30).json()
    assert state["weights_loaded"] is False, state
    assert httpx.post(f"{url}/generate", json={"input_ids": PROMPT}, timeout=30).status_code == 503
    return state


def scrape(url: str, prefix: str = "sglang:ckpt_") -> dict[tuple, float]:
    """The server's /metrics samples whose name starts with ``prefix``: {(name, (label, value)...): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{url}/metrics", timeout=30)
    resp.raise_for_status()
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
        if s.name.startswith(prefix)
    }


def sample(samples: dict[tuple, float], name: str, **labels) -> float:
    """One sample's value, 0 where it is absent (a counter nobody has incremented yet)."""
    return samples.get((name, *sorted(labels.items())), 0.0)


def push(
    url: str, checkpoint: Path, *extra: str, check: bool = True, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """Run the real loader CLI against a server. A loader still running at ``timeout_s`` is made to dump its
    threads' stacks (faulthandler on SIGUSR1) before it is killed, and the failure shows them."""
    cmd = [
        sys.executable,
        "-m",
        "sglang_ckpt_plugin.update",
        "--checkpoint-path",
        str(checkpoint),
        "--endpoint",
        url,
        "--quiet",
        "--timeout",
        "120",
        *extra,
    ]
    proc = run_with_stacks(cmd, timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"loader failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_with_stacks(cmd: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, but a hang ends with the child's Python stacks in the AssertionError."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    out, err = communicate_or_dump(child, timeout_s, f"{' '.join(cmd[:4])}...")
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def communicate_or_dump(child: subprocess.Popen, timeout_s: float, what: str) -> tuple[str, str]:
    """``child.communicate()``; a child still running at the deadline first dumps its stacks (the loader
    registers faulthandler on SIGUSR1), then is killed, and the AssertionError shows them."""
    try:
        return child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
        time.sleep(2)
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"{what} still running after {timeout_s} s; its stacks:\n{err[-20000:]}") from None


def pytest_runtest_setup(item):
    item.user_properties.append(("started_at", time.time()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test shows the tail of every server log written to while it ran (module-scoped servers
    included): "see the server log" is then in the report, not on a machine that is gone."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    from sglang_ckpt_plugin.demo.launch import SGLangServer

    since = dict(item.user_properties).get("started_at", 0.0)
    for server in SGLangServer.started():
        try:
            if server.log_path.stat().st_mtime >= since:
                report.sections.append((f"server log {server.log_path} (last 60 lines)", server.log_tail(60)))
        except OSError:
            pass


def pytest_sessionfinish(session, exitstatus):
    try:
        os.rmdir(os.environ["SGLANG_CKPT_SOCKET_DIR"])  # empty unless something leaked (tests report that)
    except OSError:
        pass
