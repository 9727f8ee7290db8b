"""Shared fixtures: tiny checkpoints made locally, HF greedy references, push helper, leak checks."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# A private socket directory for this test session (servers and loaders inherit it), so that leak checks
# see only this run's files.
os.environ["SGLANG_CKPT_SOCKET_DIR"] = tempfile.mkdtemp(prefix="sglang-ckpt-test-sockets-")

import pytest
import torch

from sglang_ckpt_plugin.demo.tiny_model import hf_greedy, make_tiny_model
from sglang_ckpt_plugin.transport.channel import socket_dir
from sglang_ckpt_plugin.transport.handles import SHM_DIR, SHM_PREFIX

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


@functools.lru_cache(maxsize=None)
def hf_reference(model_dir: str) -> list[int]:
    return hf_greedy(model_dir, PROMPT, NEW_TOKENS)


def push(url: str, checkpoint: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real loader CLI against a server."""
    cmd = [sys.executable, "-m", "sglang_ckpt_plugin.update", "--checkpoint-path", str(checkpoint),
           "--endpoint", url, "--quiet", "--timeout", "120", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"loader failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def our_leftovers() -> list[str]:
    """Shared-memory segments and socket files of ours that still exist."""
    shm = [f"{SHM_DIR}/{n}" for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)]
    socks = [str(p) for p in socket_dir().iterdir()]
    return shm + socks


@pytest.fixture
def no_leaks():
    before = set(our_leftovers())
    yield
    assert set(our_leftovers()) - before == set(), "shared memory or socket files left behind"


def pytest_sessionfinish(session, exitstatus):
    try:
        os.rmdir(os.environ["SGLANG_CKPT_SOCKET_DIR"])  # empty unless something leaked (tests report that)
    except OSError:
        pass
