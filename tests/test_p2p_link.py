"""Which transport a p2p update takes (loader/p2p_link.py), and the Mooncake engine's own calls between two
engines of this process over the loopback (transport/mooncake.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sglang_ckpt_plugin.loader import p2p_link
from sglang_ckpt_plugin.transport import mooncake


def test_torch_is_what_it_says():
    assert p2p_link._why_not("torch", "cpu") == "--p2p-transport torch"


def test_auto_leaves_gpu_buffers_to_nccl():
    assert "NCCL" in p2p_link._why_not("auto", "cuda")


def test_mooncake_is_chosen_where_it_imports():
    assert mooncake.unavailable() is None  # the test extra installs it
    assert p2p_link._why_not("auto", "cpu") is None
    assert p2p_link._why_not("mooncake", "cpu") is None
    assert (
        p2p_link._why_not("mooncake", "cuda") is None
    )  # asked for: tried (Mooncake's CUDA build registers GPU memory)


def test_without_mooncake_the_reason_says_what_to_install(monkeypatch):
    monkeypatch.setattr(p2p_link, "unavailable", lambda: f"No module named 'mooncake'; {mooncake.PACKAGE_HINT}")
    assert "sglang-ckpt-plugin[p2p]" in p2p_link._why_not("auto", "cpu")


def test_the_local_address_is_the_one_on_the_route_to_the_peer():
    assert mooncake.local_address("127.0.0.1") == "127.0.0.1"


def test_tcp_without_rdma_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(mooncake, "Path", lambda _: tmp_path / "absent")
    assert mooncake.default_protocol() == "tcp"


ENGINE_CHECK = """
import torch
from sglang_ckpt_plugin.transport import mooncake

source = torch.arange(1 << 20, dtype=torch.int32)
dest = torch.zeros_like(source)
nbytes = source.numel() * source.element_size()
owner, reader = mooncake.MooncakeEngine("127.0.0.1", "tcp"), mooncake.MooncakeEngine("127.0.0.1", "tcp")
try:
    owner.register([(source.data_ptr(), nbytes)])
    reader.register([(dest.data_ptr(), nbytes)])
    reader.read(owner.session, dest.data_ptr(), source.data_ptr(), nbytes)
    assert torch.equal(dest, source)
    try:
        reader.read(owner.session, dest.data_ptr(), source.data_ptr() + nbytes, 4096)
        raise SystemExit("a read outside the peer's registered memory succeeded")
    except OSError as exc:
        assert owner.session in str(exc), exc
finally:
    owner.close()
    reader.close()
    owner.close()  # twice: nothing left to release
print("engine check passed")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a private network namespace needs root")
def test_one_engine_reads_another_engines_registered_buffer():
    """What the exchange does per bucket: a registered source, a registered destination, one read; a read outside
    the peer's registered memory fails as an OSError naming the peer; close() releases both. In a network namespace
    of its own: Mooncake's engines listen on every interface."""
    script = 'ip link set lo up && exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, sys.executable, ENGINE_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "engine check passed" in result.stdout, result.stdout + result.stderr
