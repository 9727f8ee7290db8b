"""The cluster in one box itself (demo/cluster.py): what it builds, and that nothing of it outlives its owner,
whether the owner ends, is stopped with SIGTERM, or is killed outright (then the next cluster removes it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sglang_ckpt_plugin.demo.cluster import BLKIO, PREFIX, Cluster, ClusterSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a cluster in one box needs root")

BUILD_AND_WAIT = """
import sys, time
from sglang_ckpt_plugin.demo.cluster import Cluster, ClusterSpec
with Cluster(ClusterSpec(2, disk_mib_s=8, link_mbit=100, disk_mib=32)) as box:
    box.nodes[1].popen(["sleep", "600"], box.root / "sleep.log")  # a process on a node, left running
    print(box.name, flush=True)
    time.sleep(600)
"""


def leftovers(name: str) -> list[str]:
    found = [
        ns
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if ns.startswith(name)
    ]
    found += [str(c) for c in BLKIO.glob(f"{name}n*")]
    found += [
        line
        for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
        if f"/ckb-{name[len(PREFIX) :]}/" in line
    ]
    found += [str(p) for p in Path("/tmp").glob(f"ckb-{name[len(PREFIX) :]}")]
    return found


def start_owner() -> tuple[subprocess.Popen, str]:
    owner = subprocess.Popen([sys.executable, "-c", BUILD_AND_WAIT], stdout=subprocess.PIPE, text=True)
    name = owner.stdout.readline().strip()
    assert name.startswith(PREFIX) and leftovers(name), name
    return owner, name


def test_nodes_have_their_own_address_disk_rate_and_link(tmp_path):
    with Cluster(ClusterSpec(2, disk_mib_s=8, link_mbit=100, disk_mib=64)) as box:
        n0, n1 = box.nodes
        (n0.disk / "f").write_bytes(os.urandom(4 << 20))
        box.drop_page_cache()
        read = "import time; t = time.monotonic(); open(sys.argv[1], 'rb').read(); print(time.monotonic() - t)"
        out = subprocess.run(
            n0.command([sys.executable, "-c", f"import sys; {read}", str(box.disk / "f")]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert 0.35 < float(out) < 2.0, out  # 4 MiB at 8 MiB/s from the node's own disk, at the common path
        ping = [sys.executable, "-c", f"import socket; socket.create_connection(('{n0.address}', 9), 1)"]
        refused = subprocess.run(n1.command(ping), capture_output=True, text=True)
        assert "ConnectionRefused" in refused.stderr  # node 0 answered (nothing listens there): the link works
        assert_a_lossy_cable_loses_packets_and_tcp_delivers_all(box)
        n1.set_link(False)
        cut = subprocess.run(n1.command(ping), capture_output=True, text=True)
        assert "ConnectionRefused" not in cut.stderr and cut.returncode != 0, cut.stderr
    assert leftovers(box.name) == []


SINK = """
import socket, sys
listener = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
conn, _ = listener.accept()
got = 0
while chunk := conn.recv(1 << 20):
    got += len(chunk)
print(got, flush=True)
"""
SEND = "import socket, sys; s = socket.create_connection((sys.argv[1], 7000), 10); s.sendall(bytes(4 << 20)); s.close()"


def assert_a_lossy_cable_loses_packets_and_tcp_delivers_all(box) -> None:
    """Node 1's cable loses 10 % of its packets each way: some are dropped, and TCP still delivers every byte."""
    n0, n1 = box.nodes
    n1.lose(10)
    try:
        sink = subprocess.Popen(n0.command([sys.executable, "-c", SINK, n0.address]), stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "listening"
        subprocess.run(n1.command([sys.executable, "-c", SEND, n0.address]), check=True, timeout=60)
        assert int(sink.stdout.readline()) == 4 << 20
        sink.wait(timeout=10)
        assert n1.lost_packets() > 0
    finally:
        n1.lose(0)
    assert n1.lost_packets() == 0  # a clean cable again: no table left on either end


def test_sigterm_removes_everything():
    owner, name = start_owner()
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=60) != 0
    assert leftovers(name) == []


def test_an_owner_killed_outright_is_cleaned_up_by_the_next_cluster():
    owner, name = start_owner()
    owner.kill()
    owner.wait(timeout=30)
    time.sleep(0.5)
    assert leftovers(name), "a SIGKILLed owner cannot clean up after itself"
    with Cluster(ClusterSpec(1, disk_mib=32)):
        assert leftovers(name) == []
