"""An SGLang fleet on a cluster in one box (demo/cluster.py): one server per node, and the loader as on real
machines: ``python -m sglang_ckpt_plugin.update --nnodes N --node-rank i --master-addr <node 0>`` on every node,
each feeding its own node's server. Used by the cluster bench and the namespace tests; the caller is inside
``cluster.reachable()`` to talk to the servers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .cluster import Cluster, Node
from .launch import PLUGIN_FREE, SGLangServer
from .processes import stop_torchrun_group

LOADER_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}  # gloo (and so every bucket) goes over the node's link


MARKER = "COMPLETE"  # what a trainer writes into a checkpoint directory once it is whole (--ready-marker)


def start_servers(cluster: Cluster, model: Path, logs: Path, *, plugin: bool = True) -> list[SGLangServer]:
    """A server on every node, started together: with the plugin on dummy weights waiting for the first push, or
    (``plugin=False``) SGLang alone loading ``model`` from the node's own disk (``--load-format auto``)."""
    return [start_server(node, model, logs, plugin=plugin) for node in cluster.nodes]


def start_server(
    node: Node, model: Path, logs: Path, *, plugin: bool = True, port: int | None = None, tag: str = ""
) -> SGLangServer:
    """One node's server (``port``: the one a server there had, for a restart that loaders find where it was)."""
    kind = "plugin" if plugin else "sglang"
    return SGLangServer(
        model,
        logs / f"node{node.index}_{kind}_server{tag}.log",
        wait_for_weights=plugin,
        host=node.address,
        port=port,
        wrap=node.command,
        extra_args=["--sleep-on-idle"],
        env=None if plugin else {"SGLANG_PLUGINS": PLUGIN_FREE},
    ).start()


def stop_servers(servers: list[SGLangServer]) -> None:
    """All at once (each takes seconds to end its process group)."""
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        list(pool.map(lambda server: server.stop(), servers))


def start_loaders(
    cluster: Cluster, servers: list[SGLangServer], args: list[str], logs: Path, tag: str
) -> list[subprocess.Popen]:
    """The loader's own command on every node (``--nnodes N --node-rank i``), each feeding that node's TP = 1 server:
    the command is the node's loader rank (no torchrun agent), reading the node's share while the ranks meet at
    node 0."""
    port = random.randint(20000, 29999)  # node 0's own network: nothing else listens there
    nodes = cluster.nodes
    procs = []
    for node, server in zip(nodes, servers):
        cmd = [
            sys.executable,
            "-m",
            "sglang_ckpt_plugin.update",
            *args,
            "--endpoint",
            server.url,
            *("--nnodes", str(len(nodes)), "--node-rank", str(node.index)),
            *("--master-addr", nodes[0].address, "--master-port", str(port)),
        ]
        procs.append(node.popen(cmd, logs / f"{tag}_node{node.index}.log", env={**os.environ, **LOADER_ENV}))
    return procs


def wait_loaders(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Every loader command's exit status; one still running at the deadline is killed with its process group (and
    a torchrun agent's workers; status None)."""
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    stop_torchrun_group([p for p, code in zip(procs, codes) if code is None])
    return codes


def run_loaders(
    cluster: Cluster, servers: list[SGLangServer], args: list[str], logs: Path, tag: str, timeout_s: float = 600
) -> tuple[list[int | None], list[str]]:
    """A one-shot update on every node; each node's exit status and output."""
    codes = wait_loaders(start_loaders(cluster, servers, args, logs, tag), timeout_s)
    return codes, [(logs / f"{tag}_node{node.index}.log").read_text(errors="replace") for node in cluster.nodes]


def versions(servers: list[SGLangServer]) -> list[str | None]:
    """What each server says it serves (None: it does not answer)."""
    found = []
    for server in servers:
        try:
            found.append(httpx.get(f"{server.url}/model_info", timeout=10).json().get("weight_version"))
        except httpx.HTTPError:
            found.append(None)
    return found


def wait_versions(
    servers: list[SGLangServer],
    version: str,
    timeout_s: float,
    every_s: float = 0.05,
    loaders: list[subprocess.Popen] = (),
) -> float:
    """Seconds until every server's ``/model_info`` names ``version`` (a commit sets it as the update ends); raises
    if one of ``loaders`` (the update's processes, still running) exits with an error first."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    with httpx.Client(timeout=10) as client:
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{[s.url for s in waiting]} do not serve {version} after {timeout_s} s")
            failed = [p.returncode for p in loaders if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(f"a loader exited {failed[0]} before every server served {version}")
            try:
                if client.get(f"{waiting[0].url}/model_info").json().get("weight_version") == version:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(every_s)
    return time.perf_counter() - t0


def place_steps(cluster: Cluster, a: Path, b: Path, repeats: int) -> list[tuple[str, str]]:
    """The watched directory on every node's disk: step-1 = B, step-2 = A, ... (hard links to the copies: the
    bytes a push reads are the node's own), none ready until its marker is written. (step, "A" or "B") each."""
    steps = []
    for k in range(1, repeats + 1):
        name, source = ("B", b) if k % 2 else ("A", a)
        for node in cluster.nodes:
            step = node.disk / "watch" / f"step-{k}"
            step.mkdir(parents=True)
            for f in cluster.on_disk(node, source).iterdir():
                (step / f.name).hardlink_to(f)
        steps.append((f"step-{k}", name))
    return steps


def mark_ready(cluster: Cluster, step: str) -> None:
    """The trainer's marker on every node, node 0 (whose rank decides) last."""
    for node in reversed(cluster.nodes):
        (node.disk / "watch" / step / MARKER).write_text("")
