"""Two "nodes" on 127.0.0.1: two SGLang servers and one torchrun loader group per node (``--nnodes 2``).

Node i's loader rank feeds node i's server (its own ``--endpoint``); the two ranks read half the checkpoint
each and exchange the rest over gloo. P2P: only the listed ranks' servers are updated, fed by both ranks.
Two phases (the default): a fleet of two instances stages on both, then commits on both; a loader rank killed
while staging leaves both serving what they served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from sglang_ckpt_plugin.demo.cluster_fleet import versions
from sglang_ckpt_plugin.demo.evidence import checksum
from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port, generate_ids
from sglang_ckpt_plugin.demo.processes import children_of, stop_torchrun_group
from sglang_ckpt_plugin.loader.cli import torchrun_command

from .conftest import NEW_TOKENS, PROMPT, assert_serves, communicate_or_dump, our_leftovers, serve_other
from .test_e2e_faults import FAULTY, info
from .test_e2e_tp2 import bytes_per_rank
from .test_e2e_two_phase import Client, dropped_or_never_staged

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(llama_a, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    # two idle schedulers would spin both cores the loaders need (each kill test took ~100 s, ~40 s with this)
    pair = [SGLangServer(llama_a, logs / f"node{i}_server.log", extra_args=["--sleep-on-idle"]) for i in range(2)]
    try:
        for srv in pair:
            srv.start()
        for srv in pair:
            srv.wait_listening()
        yield pair
    finally:
        for srv in pair:
            srv.stop()
    assert [srv.group_pids() for srv in pair] == [[], []], "server processes left behind"


def run_two_nodes(
    servers, *args: str, fault: str | None = None, env: dict | None = None, check: bool = True
) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --node-rank i --master-addr 127.0.0.1`` once per node, as on two machines.
    ``fault``: every node runs tests/faulty_loader.py with that mode (``env`` says which rank it hits)."""
    port = free_port()
    procs = []
    for node, srv in enumerate(servers):
        program = ["-m", "sglang_ckpt_plugin.update"] if fault is None else [str(FAULTY), fault, "--"]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            *program,
            "--endpoint",
            srv.url,
            "--quiet",
            "--timeout",
            "120",
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
            )
        )
    results = []
    for p in procs:
        out, err = communicate_or_dump(p, 300, "loader node")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r in results:
        assert not check or r.returncode == 0, f"loader node failed:\n{r.stdout}\n{r.stderr}"
    return results


def test_p2p_join_with_a_metas_file(servers, llama_b, tmp_path):
    node0, node1 = servers
    metas = tmp_path / "metas.json"
    # first run: only node 0's server is updated; both ranks read, the plan is saved
    run_two_nodes(
        servers,
        "--update-method",
        "p2p",
        "--ranks",
        "0",
        "--checkpoint-path",
        str(llama_b),
        "--save-metas-file",
        str(metas),
        "--weight-version",
        "b-node0",
    )
    assert_serves(node0.url, llama_b)
    node0_checksum = checksum(node0.url)
    assert httpx.get(f"{node1.url}/health", timeout=30).status_code == 503  # not part of that update

    # the joining instance: no headers re-read, the saved plan says who reads what
    before = set(our_leftovers())
    results = run_two_nodes(
        servers, "--update-method", "p2p", "--ranks", "1", "--load-metas-file", str(metas), "--weight-version", "b-join"
    )
    assert set(our_leftovers()) - before == set()
    read = bytes_per_rank(results[0].stdout)
    assert all(b > 0 for b in read), read  # data came from both ranks, not only the joining one
    node1.wait_healthy(timeout_s=120)
    assert generate_ids(node1.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "b-join"
    assert_serves(node1.url, llama_b)
    assert versions([node0]) == ["b-node0"] and checksum(node0.url) == node0_checksum  # the running one was not touched


def test_two_nodes_broadcast_each_reads_half(servers, llama_a):
    results = run_two_nodes(servers, "--checkpoint-path", str(llama_a), "--weight-version", "a-2nodes")
    read = bytes_per_rank(results[0].stdout)
    assert len(read) == 2
    for b in read:
        assert 0.4 <= b / sum(read) <= 0.6, read
    for srv in servers:
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-2nodes"
        assert_serves(srv.url, llama_a)


def test_two_nodes_that_each_map_the_files_exchange_nothing(servers, llama_b):
    """``--transfer map`` on two nodes: each node's loader hands the checkpoint files to its own server ranks."""
    results = run_two_nodes(
        servers, "--checkpoint-path", str(llama_b), "--weight-version", "b-mapped", "--transfer", "map"
    )
    assert "between loader processes: 0 bytes" in results[0].stdout, results[0].stdout
    assert all("page cache: the server mapped the files" in r.stdout for r in results), [r.stdout for r in results]
    for srv in servers:
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "b-mapped"
        assert_serves(srv.url, llama_b)


def test_a_fleet_commits_only_once_every_instance_staged(servers, llama_a, llama_b):
    for srv in servers:
        serve_other(srv.url, llama_a)  # the fleet's push below must change what each instance serves
    run_two_nodes(servers, "--checkpoint-path", str(llama_b), "--weight-version", "b-fleet")
    staged = [info(srv.url)["ckpt_plugin"]["staging"] for srv in servers]
    assert staged[0]["update_id"] == staged[1]["update_id"]
    assert [s["state"] for s in staged] == ["committed", "committed"]
    assert all(s["staged_at"] <= min(t["committed_at"] for t in staged) for s in staged), staged  # stage, then commit
    for srv in servers:
        assert generate_ids(srv.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "b-fleet"
        assert_serves(srv.url, llama_b)


KILL_SEEDS = [int(x) for x in os.environ.get("CKPT_TEST_KILL_SEEDS", "11,12,13").split(",")]  # scripts/kill_trials.sh


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_a_loader_rank_killed_while_a_fleet_stages_changes_no_instance(servers, llama_a, llama_b, seed):
    run_two_nodes(servers, "--checkpoint-path", str(llama_a), "--weight-version", f"a-fleet{seed}")
    expected = [generate_ids(srv.url, PROMPT, NEW_TOKENS)["output_ids"] for srv in servers]
    before = set(our_leftovers())
    previous = [info(srv.url)["ckpt_plugin"]["staging"]["update_id"] for srv in servers]
    clients = [Client(srv.url) for srv in servers]
    try:
        results = run_two_nodes(
            servers,
            "--checkpoint-path",
            str(llama_b),
            "--weight-version",
            f"b-fleet{seed}",
            "--bucket-size",
            "300K",
            "--two-phase",
            "on",
            fault="kill-in-staging",
            check=False,
            env={"CKPT_TEST_SEED": str(seed), "CKPT_TEST_RANK": "1", "CKPT_TEST_BUCKETS": "2"},
        )
    finally:
        for c in clients:
            c.close()
    assert "killed while staging" in results[1].stdout, results[1].stdout + results[1].stderr
    assert results[0].returncode != 0 and results[1].returncode != 0
    for srv, client, ids in zip(servers, clients, expected):
        assert client.errors == [], client.errors  # no 503, no failure: served all along
        assert {v for _, _, v, _ in client.seen} == {f"a-fleet{seed}"}
        assert all(out == ids for *_, out in client.seen)
        doc = info(srv.url)
        assert doc["weight_version"] == f"a-fleet{seed}" and doc["ckpt_plugin"]["weights_state"] == "complete"
        assert dropped_or_never_staged(doc["ckpt_plugin"]["staging"], previous[servers.index(srv)])
    assert set(our_leftovers()) - before == set()
    run_two_nodes(servers, "--checkpoint-path", str(llama_b), "--weight-version", f"b-fleet{seed}-again")
    for srv in servers:
        assert_serves(srv.url, llama_b)


def start_resident_group(servers, watched, status, logs) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for node, srv in enumerate(servers):
        loader = ["--watch", str(watched), "--endpoint", srv.url, "--quiet", "--timeout", "120", "--poll-s", "0.2"]
        cmd = torchrun_command([*loader, "--status-file", str(status)], port=port, nnodes=2, node_rank=node)
        with open(logs[node], "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def test_a_resident_loader_group_that_loses_a_rank_stops_with_an_error(servers, tmp_path):
    """A loader rank of a resident group dies (SIGKILL): the group stops, exit status != 0, nothing left behind."""
    import signal
    import time

    before = set(our_leftovers())
    served = versions(servers)
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = start_resident_group(servers, tmp_path / "empty", tmp_path / "status.json", logs)
    try:
        deadline = time.monotonic() + 120
        while "[sglang-ckpt watch] watching" not in logs[0].read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        for pid in children_of(procs[1].pid):
            os.kill(pid, signal.SIGKILL)
        assert procs[0].wait(timeout=120) != 0, logs[0].read_text()[-3000:]
        assert "a loader rank of this resident group is gone" in logs[0].read_text(), logs[0].read_text()[-3000:]
        assert procs[1].wait(timeout=120) != 0, logs[1].read_text()[-3000:]
    finally:
        stop_torchrun_group(procs)
    assert set(our_leftovers()) - before == set()
    assert versions(servers) == served


def test_a_resident_loader_group_keeps_the_fleet_on_the_newest_checkpoint(servers, llama_a, llama_b, tmp_path):
    """``--watch`` on both nodes (one torchrun group): a new checkpoint goes to both instances; node 1's server,
    killed and restarted on dummy weights, is refilled alone (node 0's is not touched); Ctrl-C on both nodes (SIGINT
    to each torchrun's process group, as a terminal sends it) stops the group at its next meeting, nothing staged."""
    import signal
    import time

    from .test_e2e_watch import serves_version

    watched, status = tmp_path / "ckpts", tmp_path / "status.json"
    watched.mkdir()
    for srv in servers:
        serve_other(srv.url, llama_a)  # the group's first push (llama_b) must change what each instance serves
    before = set(our_leftovers())
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = start_resident_group(servers, watched, status, logs)

    def wait(check, what: str, timeout_s: float = 180.0):
        deadline = time.monotonic() + timeout_s
        while not check():
            assert all(p.poll() is None for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
            assert time.monotonic() < deadline, f"not {what}:\n" + "\n".join(log.read_text()[-3000:] for log in logs)
            time.sleep(0.2)

    try:
        shutil.copytree(llama_b, watched / "step-10")
        wait(lambda: all(serves_version(srv.url, "step-10")() for srv in servers), "both serving step-10")
        for srv in servers:
            assert_serves(srv.url, llama_b)
        node0_update = info(servers[0].url)["ckpt_plugin"]["last_update"]

        servers[1].stop()
        servers[1].start()
        servers[1].wait_listening()
        wait(serves_version(servers[1].url, "step-10"), "node 1 refilled")
        assert "refilled" in logs[0].read_text()
        assert info(servers[0].url)["ckpt_plugin"]["last_update"] == node0_update  # the serving one: untouched
        assert_serves(servers[1].url, llama_b)

        for p in procs:
            os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            p.wait(timeout=90)
        assert "[sglang-ckpt watch] stopped" in logs[0].read_text(), logs[0].read_text()[-3000:]
        assert json.loads(status.read_text())["stopped"] is True
    finally:
        stop_torchrun_group(procs)
    assert set(our_leftovers()) - before == set()
    for srv in servers:
        assert info(srv.url)["ckpt_plugin"]["staging"]["state"] in ("committed", "released")
        assert serves_version(srv.url, "step-10")()
