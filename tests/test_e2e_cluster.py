"""Two nodes of a cluster in one box (demo/cluster.py): each its own network namespace and address, a rate-limited
link, a disk of its own read at a set rate, a real SGLang server, and the loader's own command on each node
(``--nnodes 2 --node-rank i --master-addr <node 0>``: the node's loader rank), as on two machines.

A broadcast push: each node reads half of the checkpoint from its own disk and receives the other half over its
link; both serve exactly what SGLang's own reload of the same files serves. A link cut mid-update: the update fails
on both nodes within the loader's ``--timeout``, naming the lost peer; both keep serving what they served (one
version), nothing is left behind, and once the cable is back the next push lands on both. A p2p push over Mooncake
(and a join from its metas file) updates node 1 alone. A slow link that loses packets delays a push, which lands on
both. A node whose server dies and comes back is refilled by the resident loader (``--watch``), the other node
untouched.
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
import torch

from sglang_ckpt_plugin.demo.cluster import Cluster, ClusterSpec
from sglang_ckpt_plugin.demo.cluster_fleet import (
    MARKER,
    mark_ready,
    place_steps,
    run_loaders,
    start_loaders,
    start_server,
    start_servers,
    stop_servers,
    versions,
    wait_loaders,
    wait_versions,
)
from sglang_ckpt_plugin.demo.evidence import checksum
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

from .conftest import assert_serves, our_leftovers, serve_other
from .test_e2e_tp2 import bytes_per_rank

pytestmark = [
    pytest.mark.slow,
    # as root a missing tool fails the test (scripts/cluster_tools.sh, which .ci/run calls, installs them)
    pytest.mark.skipif(os.geteuid() != 0, reason="a cluster in one box needs root (namespaces, loop devices)"),
]

LINK_MBIT = 400
DISK_MIB_S = 8


@pytest.fixture(scope="module")
def models(ckpt_root):
    """A and B of one shape, ~18 MB each: big enough that a push takes a while on these disks and links."""
    shape = dict(hidden=256, layers=4, vocab=4000, dtype=torch.float32)
    return make_tiny_model(ckpt_root / "cluster_a", seed=0, **shape), make_tiny_model(
        ckpt_root / "cluster_b", seed=1, max_shard_size="4MB", **shape
    )


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster_logs")
    with Cluster(ClusterSpec(2, disk_mib_s=DISK_MIB_S, link_mbit=LINK_MBIT, disk_mib=128)) as box:
        on_nodes = {name: box.copy_to_every_disk(path, name) for name, path in zip("AB", models)}
        with box.reachable():
            servers = start_servers(box, on_nodes["A"], logs)
            try:
                for server in servers:
                    server.wait_listening()
                yield box, servers, on_nodes, logs
            finally:
                stop_servers(servers)
                assert [s.group_pids() for s in servers] == [[], []], "server processes left behind"
        assert all(node.pids() == [] for node in box.nodes), "processes left on a node"


def push(box, servers, logs, ckpt, version: str, *extra: str, tag: str = "push"):
    return run_loaders(
        box, servers, ["--checkpoint-path", str(ckpt), "--weight-version", version, *extra], logs, tag, timeout_s=300
    )


def test_broadcast_push_each_node_reads_half_from_its_own_disk(cluster, models):
    box, servers, on_nodes, logs = cluster
    with box.reachable():
        for server in servers:
            serve_other(server.url, on_nodes["A"])  # the push must change what each node serves
        box.drop_page_cache()
        codes, outs = push(box, servers, logs, on_nodes["B"], "b-cluster")
        assert codes == [0, 0], outs
        read = bytes_per_rank(outs[0])
        assert len(read) == 2 and all(0.4 <= b / sum(read) <= 0.6 for b in read), read
        for out in outs:  # each node's command is its loader rank (no torchrun agent), reading ahead while it waits
            ahead = re.findall(r"\] while waiting for the server: read ([\d.]+) GB of its ([\d.]+) GB share", out)
            assert len(ahead) == 1, out  # under torchrun: the command's line, then the rank's
        assert versions(servers) == ["b-cluster", "b-cluster"]
        for server in servers:
            assert_serves(server.url, on_nodes["B"], hf_checkpoint=models[1])


def staging_of(server) -> dict:
    return httpx.get(f"{server.url}/model_info", timeout=10).json()["ckpt_plugin"]["staging"]


def test_a_link_cut_mid_update_leaves_every_node_on_one_version(cluster, models):
    box, servers, on_nodes, logs = cluster
    node1 = box.nodes[1]
    with box.reachable():
        push(box, servers, logs, on_nodes["A"], "a-before-cut", tag="before_cut")
        served = [(checksum(s.url), s.url) for s in servers]
        previous = staging_of(servers[0])["update_id"]
        before = set(our_leftovers())
        box.drop_page_cache()
        node1.shape("tbf", "rate", "4mbit", "burst", "64kb", "latency", "400ms")  # ~9 s to send its half
        loaders = start_loaders(
            box,
            servers,
            ["--checkpoint-path", str(on_nodes["B"]), "--weight-version", "b-cut", "--timeout", "30"],
            logs,
            "cut",
        )
        try:
            deadline = time.monotonic() + 120
            while staging_of(servers[0])["update_id"] == previous:  # the update has reached node 0's server
                assert time.monotonic() < deadline, "the update never began staging"
                assert all(p.poll() is None for p in loaders), "a loader ended before the cut"
                time.sleep(0.2)
            time.sleep(1.0)
            node1.set_link(False)
            cut_at = time.monotonic()
            codes = wait_loaders(loaders, 120)
            failed_after = time.monotonic() - cut_at
        finally:
            node1.set_link(True)
            node1.shape("tbf", "rate", f"{LINK_MBIT}mbit", "burst", "1mb", "latency", "100ms")
        outs = [(logs / f"cut_node{i}.log").read_text(errors="replace") for i in range(2)]
        assert all(code not in (0, None) for code in codes), (codes, outs)
        assert all("did not move between the loader ranks within --timeout" in out for out in outs), outs
        assert failed_after < 30 + 30, f"the failure took {failed_after:.0f} s to surface (--timeout 30)"
        for server, (was, _) in zip(servers, served):
            assert versions([server]) == ["a-before-cut"]
            assert checksum(server.url) == was
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        time.sleep(2)  # a server drops what it staged of a failed update when the loader's channel ends
        assert set(our_leftovers()) - before == set()

        codes, outs = push(box, servers, logs, on_nodes["B"], "b-after-cut", tag="after_cut")
        assert codes == [0, 0], outs
        assert versions(servers) == ["b-after-cut", "b-after-cut"]
        for server in servers:
            assert_serves(server.url, on_nodes["B"], hf_checkpoint=models[1])


def test_a_node_whose_loader_rank_is_killed_mid_update_leaves_every_node_on_one_version(cluster, models):
    """Node 1's loader rank dies (SIGKILL) while the update stages: node 0's loader fails within --timeout, both
    servers keep serving what they served, nothing is left behind, and the next push lands on both."""
    box, servers, on_nodes, logs = cluster
    node1 = box.nodes[1]
    with box.reachable():
        push(box, servers, logs, on_nodes["A"], "a-before-kill", tag="before_kill")
        served = [checksum(s.url) for s in servers]
        previous = staging_of(servers[0])["update_id"]
        before = set(our_leftovers())
        box.drop_page_cache()
        node1.shape("tbf", "rate", "4mbit", "burst", "64kb", "latency", "400ms")  # the update stays in flight
        args = ["--checkpoint-path", str(on_nodes["B"]), "--weight-version", "b-kill", "--timeout", "30"]
        loaders = start_loaders(box, servers, args, logs, "kill")
        try:
            deadline = time.monotonic() + 120
            while staging_of(servers[0])["update_id"] == previous:
                assert time.monotonic() < deadline, "the update never began staging"
                assert all(p.poll() is None for p in loaders), "a loader ended before the kill"
                time.sleep(0.2)
            os.kill(loaders[1].pid, signal.SIGKILL)  # the node's command is its loader rank
            killed_at = time.monotonic()
            codes = wait_loaders(loaders, 120)
            failed_after = time.monotonic() - killed_at
        finally:
            node1.shape("tbf", "rate", f"{LINK_MBIT}mbit", "burst", "1mb", "latency", "100ms")
        outs = [(logs / f"kill_node{i}.log").read_text(errors="replace") for i in range(2)]
        assert all(code not in (0, None) for code in codes), (codes, outs)
        # node 0's rank names what happened, not only gloo's words: in a bucket's move or in an agreement, a reset
        # connection or (the reset lost on the shaped link) --timeout
        said = r"(did not move between the loader ranks|could not agree)( within --timeout)?: a node's link, machine"
        assert re.search(said, outs[0]), outs[0]
        assert failed_after < 30 + 30, f"the failure took {failed_after:.0f} s to surface (--timeout 30)"
        assert versions(servers) == ["a-before-kill", "a-before-kill"]
        assert [checksum(s.url) for s in servers] == served
        assert all(httpx.get(f"{s.url}/health", timeout=30).status_code == 200 for s in servers)
        time.sleep(2)  # a server drops what it staged of a failed update when the loader's channel ends
        assert set(our_leftovers()) - before == set()

        codes, outs = push(box, servers, logs, on_nodes["B"], "b-after-kill", tag="after_kill")
        assert codes == [0, 0], outs
        for server in servers:
            assert_serves(server.url, on_nodes["B"], hf_checkpoint=models[1])


def test_a_mooncake_p2p_push_updates_only_the_listed_node(cluster, models, tmp_path):
    """``--update-method p2p --ranks 1 --p2p-transport mooncake``: node 1 reads node 0's share out of node 0's
    registered buckets (Mooncake over TCP, across the link); node 0's server is not touched. Then the join of a new
    instance from the metas file that run saved: the same plan, no headers planned again, over Mooncake too."""
    box, servers, on_nodes, logs = cluster
    metas = tmp_path / "metas.json"
    with box.reachable():
        serve_other(servers[1].url, on_nodes["A"])
        untouched = (versions(servers[:1]), checksum(servers[0].url))
        box.drop_page_cache()
        args = ["--update-method", "p2p", "--ranks", "1", "--p2p-transport", "mooncake"]
        codes, outs = push(box, servers, logs, on_nodes["B"], "b-mooncake", *args, "--save-metas-file", str(metas))
        assert codes == [0, 0], outs
        assert "p2p transport: Mooncake Transfer Engine, tcp one-sided reads" in outs[0], outs[0]
        read = bytes_per_rank(outs[0])
        assert len(read) == 2 and all(b > 0 for b in read), read  # both nodes read their share from their own disk
        assert versions(servers[1:]) == ["b-mooncake"]
        assert (versions(servers[:1]), checksum(servers[0].url)) == untouched
        assert_serves(servers[1].url, on_nodes["B"], hf_checkpoint=models[1])

        serve_other(servers[1].url, on_nodes["A"])
        join = ["--load-metas-file", str(metas), "--checkpoint-path", str(on_nodes["B"]), "--weight-version", "b-join"]
        codes, outs = run_loaders(box, servers, [*args, *join], logs, "mooncake_join", timeout_s=300)
        assert codes == [0, 0], outs
        assert "p2p transport: Mooncake Transfer Engine" in outs[0], outs[0]
        assert versions(servers[1:]) == ["b-join"]
        assert (versions(servers[:1]), checksum(servers[0].url)) == untouched
        assert_serves(servers[1].url, on_nodes["B"], hf_checkpoint=models[1])


def test_a_slow_lossy_link_delays_a_push_but_every_node_serves_it(cluster, models):
    """Node 1's link at 20 Mbit/s (``tc tbf``) losing 2 % of its packets each way (nftables; this machine's kernel
    has no ``netem``): its half takes seconds to cross, TCP resends what was lost, and the push lands on both."""
    box, servers, on_nodes, logs = cluster
    node1 = box.nodes[1]
    with box.reachable():
        for server in servers:
            serve_other(server.url, on_nodes["A"])
        node1.shape("tbf", "rate", "20mbit", "burst", "64kb", "latency", "400ms")
        node1.lose(2)
        try:
            codes, outs = push(box, servers, logs, on_nodes["B"], "b-slow", tag="slow")
            lost = node1.lost_packets()
        finally:
            node1.lose(0)
            node1.shape("tbf", "rate", f"{LINK_MBIT}mbit", "burst", "1mb", "latency", "100ms")
        assert codes == [0, 0], outs
        assert lost > 0, "the link lost nothing: the test did not test a lossy link"
        assert versions(servers) == ["b-slow", "b-slow"]
        for server in servers:
            assert_serves(server.url, on_nodes["B"], hf_checkpoint=models[1])


def test_a_node_whose_server_dies_is_refilled_by_the_resident_loader_when_it_comes_back(cluster, models):
    box, servers, on_nodes, logs = cluster
    with box.reachable():
        ((step, _name),) = place_steps(box, on_nodes["A"], on_nodes["B"], 1)  # step-1: B
        watch = ["--watch", str(box.disk / "watch"), "--ready-marker", MARKER, "--poll-s", "0.2", "--timeout", "60"]
        watchers = start_loaders(box, servers, watch, logs, "watch")
        try:
            mark_ready(box, step)
            wait_versions(servers, step, 240)
            served = checksum(servers[0].url)
            servers[1].stop()  # node 1's server dies (its whole process group)
            servers[1] = start_server(box.nodes[1], on_nodes["A"], logs, port=servers[1].port, tag="_restarted")
            servers[1].wait_listening()  # dummy weights, 503 until a push: the resident loader refills it
            wait_versions(servers[1:], step, 240)
            assert versions(servers[:1]) == [step] and checksum(servers[0].url) == served  # node 0 untouched
        finally:
            for w in watchers:
                w.terminate()
            codes = wait_loaders(watchers, 60)
        outs = [(logs / f"watch_node{i}.log").read_text(errors="replace") for i in range(2)]
        # each node's command is its loader rank: SIGTERM stops both at their next meeting, and both exit 0
        assert codes == [0, 0] and "[sglang-ckpt watch] stopped" in outs[0], (codes, outs)
        assert f"refilled {servers[1].url} with {step}" in outs[0], outs[0][-3000:]
        assert_serves(servers[1].url, on_nodes["B"], hf_checkpoint=models[1])
