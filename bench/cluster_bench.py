"""``make bench-cluster``: the spec's multi-node speed-up, measured on a cluster in one box (demo/cluster.py).

For each N in ``--nodes``: N emulated nodes, each a network namespace linked at ``--link-mbit`` (both ways) with a
disk of its own read at ``--disk-mib-s`` that holds a copy of checkpoints A and B. Every read timed comes from the
node's disk (the page cache of every node's files is dropped before it).

- SGLang alone (``SGLANG_PLUGINS`` without the plugin), every node reading the whole checkpoint from its own disk:
  its ``--load-format auto`` start (launch until every node's server is healthy), then its
  ``/update_weights_from_disk`` on every node at once (B, then A; the median).
- The plugin: servers on dummy weights with ``--wait-for-initial-weights``; the one-shot loader (``python -m
  sglang_ckpt_plugin.update --nnodes N --node-rank i`` on every node, the node's loader rank; each node
  reading 1/N of the checkpoint, the rest broadcast over the links) from launch until every node serves (the
  loaders' own exit, printed, comes after); then a resident loader (``--watch``, started once) pushing B, A, B ...
  as each appears: from the trainer's ``COMPLETE`` marker until every node serves it. The one-shot minus the
  resident push is the fixed cost of a start (Python, imports, rendezvous).
- The bound the rates allow for a push: max(S / (N * disk), S * (N-1)/N / link) (each node reads its share; each
  node receives the other shares over its link), and SGLang's own: S / disk.

Every push and reload changes what is served, and each must leave SGLang's ``/weights_checker`` checksum equal to
the one SGLang itself shows after loading that checkpoint, on every node, or the bench fails. Targets (the table
of bench/targets.py): a push's speed-up over SGLang's disk reload >= 0.8 * N while disk-bound, and within 1.25x of
the bound. Root only (namespaces, loop devices, cgroups); everything is removed on exit.

    python bench/cluster_bench.py [--nodes 1,2,3,4] [--gb 0.3] [--disk-mib-s 16] [--link-mbit 4000] [--repeats 3]
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from baselines import GB, bench_parser, time_disk_update  # noqa: E402
from push_bench import checkpoint_bytes, checkpoint_pair  # noqa: E402
from targets import Target, print_verdicts  # noqa: E402

from sglang_ckpt_plugin.demo.cluster import MIB, Cluster, ClusterSpec  # noqa: E402
from sglang_ckpt_plugin.demo.cluster_fleet import (  # noqa: E402
    MARKER,
    mark_ready,
    place_steps,
    start_loaders,
    start_servers,
    stop_servers,
    wait_loaders,
    wait_versions,
)
from sglang_ckpt_plugin.demo.evidence import checksum  # noqa: E402


@dataclass
class NodesResult:
    nodes: int
    sglang_start_s: float
    sglang_reload_s: float
    plugin_start_s: float  # launch to every node serving, the one-shot push included
    oneshot_s: float
    resident_s: float
    bound_s: float
    sglang_bound_s: float
    disk_bound: bool


class Checker:
    """SGLang's own checksum of each checkpoint (its own load) against what every node serves after each update."""

    def __init__(self) -> None:
        self.reference: dict[str, str] = {}
        self.mismatches: list[str] = []

    def record(self, name: str, servers) -> None:
        sums = {checksum(s.url) for s in servers}
        if len(sums) != 1 or self.reference.setdefault(name, next(iter(sums))) not in sums:
            self.mismatches.append(f"SGLang's own load of {name} shows {sums}, expected {self.reference[name]}")

    def check(self, name: str, servers, what: str) -> None:
        for s in servers:
            got = checksum(s.url)
            if got != self.reference[name]:
                self.mismatches.append(
                    f"{what}: {s.url} serves checksum {got}, SGLang's own load of {name} shows {self.reference[name]}"
                )


def all_at_once(servers, fn) -> float:
    """Seconds until ``fn(server)`` returned on every server, all started together."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(fn, servers))
    return time.perf_counter() - t0


def wait_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.1)


def sglang_alone(cluster: Cluster, a: Path, b: Path, checker: Checker, logs: Path) -> tuple[float, list[float]]:
    """SGLang without the plugin on every node: its start reading A, then its disk reloads of B and A, every node
    from its own disk, all at once. (start seconds, reload seconds)."""
    cluster.drop_page_cache()
    t0 = time.perf_counter()
    servers = start_servers(cluster, a, logs, plugin=False)
    try:
        for s in servers:
            s.wait_healthy(timeout_s=900)
        start = time.perf_counter() - t0
        checker.record("A", servers)
        reloads = []
        for name, path in (("B", b), ("A", a)):
            cluster.drop_page_cache()
            reloads.append(all_at_once(servers, lambda s, path=path, name=name: time_disk_update(s.url, path, name)))
            checker.record(name, servers)
    finally:
        stop_servers(servers)
    print(f"SGLang alone: start {start:.2f} s, disk reload {reloads}", flush=True)
    return start, reloads


def with_plugin(cluster: Cluster, a: Path, steps, checker: Checker, logs: Path) -> tuple[float, float, list[float]]:
    """Servers on dummy weights, a one-shot push of A, then a resident loader's pushes of ``steps``.
    (start + one-shot push seconds, one-shot push seconds, each resident push's seconds)."""
    n = len(cluster.nodes)
    cluster.drop_page_cache()
    t0 = time.perf_counter()
    servers = start_servers(cluster, a, logs, plugin=True)
    try:
        for s in servers:
            s.wait_listening(timeout_s=900)
        t1 = time.perf_counter()
        oneshot_args = ["--checkpoint-path", str(a), "--weight-version", "oneshot-A", "--quiet", "--timeout", "600"]
        loaders = start_loaders(cluster, servers, oneshot_args, logs, "oneshot")
        try:
            oneshot = wait_versions(servers, "oneshot-A", 600, loaders=loaders)  # served: the loaders still exit
            start = time.perf_counter() - t0
        finally:
            codes = wait_loaders(loaders, 120)
            exited = time.perf_counter() - t1
        if codes != [0] * n:
            log = (logs / "oneshot_node0.log").read_text(errors="replace")
            raise RuntimeError(f"one-shot loader exited {codes}:\n{log[-3000:]}")
        checker.check("A", servers, f"{n} nodes, one-shot push of A")
        status = cluster.root / "watch-status.json"
        watch = ["--watch", str(cluster.disk / "watch"), "--ready-marker", MARKER, "--poll-s", "0.1"]
        watchers = start_loaders(
            cluster, servers, [*watch, "--status-file", str(status), "--quiet", "--timeout", "600"], logs, "watch"
        )
        try:
            wait_file(status, 300)
            resident = []
            for step, name in steps:
                cluster.drop_page_cache()
                mark_ready(cluster, step)
                resident.append(wait_versions(servers, step, 600))
                checker.check(name, servers, f"{n} nodes, resident push of {step} ({name})")
        finally:
            for w in watchers:
                w.terminate()
            wait_loaders(watchers, 60)
    finally:
        stop_servers(servers)
    print(
        f"plugin: start + one-shot push {start:.2f} s (served {oneshot:.2f} s after the loaders' launch, every "
        f"loader exited after {exited:.2f} s), resident {resident}",
        flush=True,
    )
    return start, oneshot, resident


def measure(n: int, args, pair: tuple[Path, Path], nbytes: int, checker: Checker, logs: Path) -> NodesResult:
    disk_bps, link_bps = args.disk_mib_s * MIB, args.link_mbit * 1e6 / 8
    disk_mib = math.ceil(2.2 * nbytes / MIB) + 64  # A and B, and the file system's own
    spec = ClusterSpec(n, disk_mib_s=args.disk_mib_s, link_mbit=args.link_mbit, disk_mib=disk_mib)
    with Cluster(spec) as cluster, cluster.reachable():
        a, b = (cluster.copy_to_every_disk(p, name) for p, name in zip(pair, "AB"))
        steps = place_steps(cluster, a, b, args.repeats)
        print(f"\n== {n} node(s): disk {args.disk_mib_s:g} MiB/s each, link {args.link_mbit:g} Mbit/s each way")
        sglang_start, reloads = sglang_alone(cluster, a, b, checker, logs)
        plugin_start, oneshot, resident = with_plugin(cluster, a, steps, checker, logs)
    share_s, network_s = nbytes / (n * disk_bps), nbytes * (n - 1) / n / link_bps
    return NodesResult(
        n,
        sglang_start,
        statistics.median(reloads),
        plugin_start,
        oneshot,
        statistics.median(resident),
        max(share_s, network_s),
        nbytes / disk_bps,
        share_s >= network_s,
    )


def report(results: list[NodesResult], nbytes: int, args) -> list[Target]:
    print(
        f"\ncheckpoint {nbytes / GB:.3f} GB; each node's disk {args.disk_mib_s:g} MiB/s, link {args.link_mbit:g} "
        f"Mbit/s each way; medians of {args.repeats} pushes and 2 SGLang reloads\n"
    )
    print(
        "| nodes | SGLang start (auto) | plugin start + one-shot push | SGLang disk reload | one-shot push | "
        "resident push | bound | speed-up (resident / one-shot) |\n|---|---|---|---|---|---|---|---|"
    )
    targets = []
    for r in results:
        print(
            f"| {r.nodes} | {r.sglang_start_s:.2f} s | {r.plugin_start_s:.2f} s | {r.sglang_reload_s:.2f} s | "
            f"{r.oneshot_s:.2f} s | {r.resident_s:.2f} s | {r.bound_s:.2f} s"
            f"{'' if r.disk_bound else ' (link-bound)'} | {r.sglang_reload_s / r.resident_s:.2f}x / "
            f"{r.sglang_reload_s / r.oneshot_s:.2f}x |"
        )
        if r.disk_bound:
            for method, seconds in (("resident", r.resident_s), ("one-shot", r.oneshot_s)):
                promise = f"{r.nodes} node(s): {method} push's speed-up over SGLang's disk reload, >= 0.8 x N"
                targets.append(Target(promise, r.sglang_reload_s / seconds, 0.8 * r.nodes, at_most=False, unit="x"))
        targets.append(
            Target(
                f"{r.nodes} node(s): resident push within 1.25x of the bound the rates allow",
                r.resident_s,
                1.25 * r.bound_s,
            )
        )
    print(
        "\nfixed cost of a one-shot start (one-shot minus resident push): "
        + ", ".join(f"N={r.nodes}: {r.oneshot_s - r.resident_s:.2f} s" for r in results)
    )
    return targets


def main() -> int:
    p = bench_parser(__doc__, repeats=3)
    p.set_defaults(gb=0.3)
    p.add_argument("--nodes", default="1,2,3,4", help="cluster sizes to measure")
    p.add_argument("--disk-mib-s", type=float, default=16.0, help="each node's disk read rate")
    p.add_argument("--link-mbit", type=float, default=4000.0, help="each node's link rate, each way")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cluster-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="cluster-bench-logs-"))
    # many tensors of a few MB each (hidden 1024, vocab 8192), as in a large model: a share of the reads is 1/N of
    # the bytes (a tensor is never split; with a 131 MB embedding the largest would set every node's share)
    pair = checkpoint_pair(work, args.gb, hidden=1024, vocab=8192).paths
    nbytes = checkpoint_bytes(pair[0])
    checker = Checker()
    results = [measure(int(n), args, pair, nbytes, checker, logs) for n in args.nodes.split(",")]
    targets = report(results, nbytes, args)
    print_verdicts("cluster bench", targets)
    if checker.mismatches:
        print("\nWRONG WEIGHTS:\n" + "\n".join(checker.mismatches))
        return 1
    print(f"\nevery push served what SGLang's own load of the same checkpoint serves (logs: {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
