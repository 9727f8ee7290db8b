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
        n1.set_link(False)
        cut = subprocess.run(n1.command(ping), capture_output=True, text=True)
        assert "ConnectionRefused" not in cut.stderr and cut.returncode != 0, cut.stderr
    assert leftovers(box.name) == []


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


READ_A_SHARE = """
import os
import sys
from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
from sglang_ckpt_plugin.loader.plan import plan_buckets, shard_by_bytes
from sglang_ckpt_plugin.loader.reader import CheckpointReader

share = shard_by_bytes(read_checkpoint(sys.argv[1]), 2)[0]  # rank 0 of 2: its tensors lie between rank 1's
reader = CheckpointReader()
if sys.argv[2] == "kernel-read-ahead":  # the comparison: the same reads with the kernel's default read-ahead
    for path in {t.file for t in share}:
        os.posix_fadvise(reader.fd(path), 0, 0, os.POSIX_FADV_NORMAL)
buckets = plan_buckets(share, max(4 << 20, *(t.nbytes for t in share)))
buffer = memoryview(bytearray(max(b.nbytes for b in buckets)))
for bucket in buckets:
    reader.fill(bucket, buffer)
print(sum(t.nbytes for t in share))
"""


def device_read_bytes(node) -> int:
    text = (node.cgroup / "blkio.throttle.io_service_bytes").read_text()
    return sum(int(line.split()[2]) for line in text.splitlines() if " Read " in line)


def test_a_rank_reads_from_disk_little_more_than_its_share(tmp_path):
    """The loader's reader asks for no kernel read-ahead: a rank filling its buckets from a throttled disk reads
    its own tensors, not the neighbours' too. Against the same reads with the kernel's read-ahead, in the same run
    (here about 31% more than the share against 8%: the page cache's large folios at the edges of ~1 MB tensors)."""
    import torch

    from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

    make_tiny_model(tmp_path / "ckpt", hidden=512, layers=4, vocab=4096, dtype=torch.float32)
    with Cluster(ClusterSpec(1, disk_mib_s=64, disk_mib=128)) as box:
        node = box.nodes[0]
        path = box.copy_to_every_disk(tmp_path / "ckpt", "ckpt")

        def read_share(mode: str) -> tuple[int, int]:
            box.drop_page_cache()
            before = device_read_bytes(node)
            command = node.command([sys.executable, "-c", READ_A_SHARE, str(path), mode])
            result = subprocess.run(command, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            return int(result.stdout), device_read_bytes(node) - before

        asked, read = read_share("ours")
        _, with_read_ahead = read_share("kernel-read-ahead")
        assert asked <= read <= asked * 1.2 and read < 0.92 * with_read_ahead, (asked, read, with_read_ahead)
