"""Two-phase updates (``make bench`` runs this after push_bench.py): the pause clients see against the whole update
and against SGLang's own ``/update_weights_from_disk`` of the same bytes, for 1 loader rank, 2 loader ranks and a
fleet of 2 instances fed by one loader group; staging time of 1 and 2 ranks when each rank's reads are slow
(``SGLANG_CKPT_READ_RATE`` per rank); the commit skew across the fleet.

    python bench/two_phase_bench.py [--gb 1.0] [--repeats 2] [--read-rate 300M] [--workdir DIR]

Two servers, same run: every row's pause is measured by the same probe (a 1-token greedy ``/generate`` every 50 ms
on each server; the pause is the longest latency of a request sent while the update ran). Every update writes the
checkpoint its servers do not serve (A and B in turn, bench/alternation.py); the greedy output after it must equal
the output after SGLang's own disk reload of that checkpoint, or the bench fails.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port
from sglang_ckpt_plugin.loader.cli import torchrun_command

sys.path.insert(0, str(Path(__file__).parent))
from alternation import Alternation  # noqa: E402
from baselines import GB, SERVER_ARGS, PauseProbe, bench_parser, time_disk_update  # noqa: E402
from node_bench import Fleet  # noqa: E402
from push_bench import checkpoint_bytes, checkpoint_pair, loader_cmd, warm_page_cache  # noqa: E402
from targets import Target, print_verdicts  # noqa: E402


def fleet_cmds(urls: list[str], ckpt: Path, version: str, extra: list[str]) -> list[list[str]]:
    """One torchrun per "node" (as on two machines), each loader rank feeding its own server (broadcast)."""
    port = free_port()
    args = ["--checkpoint-path", str(ckpt), "--weight-version", version, "--quiet", *extra]
    return [
        torchrun_command(["--endpoint", url, *args], port=port, nnodes=len(urls), node_rank=i)
        for i, url in enumerate(urls)
    ]


def run_all(cmds: list[list[str]], env: dict | None = None) -> list[str]:
    """Run the commands at once; their stdout (all must succeed)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"loader failed: {out[-2000:]}\n{err[-3000:]}")
        outs.append(out)
    return outs


def figure(out: str, label: str) -> float | None:
    found = re.search(rf"{re.escape(label)} ([\d.]+) s", out)
    return float(found.group(1)) if found else None


def measure(urls: list[str], update) -> dict:
    """Pause on every server (the largest), the update's own seconds, and what update() returned."""
    probes = [PauseProbe(u) for u in urls]
    for p in probes:
        p.__enter__()
    try:
        time.sleep(1.0)
        start = time.perf_counter()
        result = update()
        end = time.perf_counter()
        time.sleep(0.5)
    finally:
        for p in probes:
            p.__exit__(None, None, None)
    row = {
        "idle": max(p.idle(start) for p in probes),
        "pause": max(p.pause(start, end) for p in probes),
        "whole": end - start,
        "result": result,
    }
    # two phases: split the pause at the moment each server had staged (/model_info staging.staged_at, epoch)
    epoch_to_perf = time.time() - time.perf_counter()
    staged = []
    for u in urls:
        doc = httpx.get(f"{u}/model_info", timeout=30).json()["ckpt_plugin"].get("staging") or {}
        at = doc.get("staged_at")
        staged.append(at - epoch_to_perf if at and start <= at - epoch_to_perf <= end else None)
    if all(staged):
        row["while_staging"] = max(p.pause(start, at) for p, at in zip(probes, staged))
        row["staged_to_end"] = max(p.pause(at, end) for p, at in zip(probes, staged))
    return row


def rounds(pair: Alternation, methods: dict, urls: list[str], repeats: int, rows: dict, skews: list) -> None:
    """``repeats`` rounds, methods interleaved within a round so machine noise hits all alike; each update writes the
    checkpoint its servers do not serve, and then they must serve exactly that one."""
    for i in range(repeats):
        print(f"round {i + 1}/{repeats} of {len(methods)} methods", flush=True)
        for name, (count, update) in methods.items():
            targets, k, version = urls[:count], pair.next_index(urls[:count]), f"r{i}"
            warm_page_cache(pair.path(k))
            rows[name].append(measure(targets, functools.partial(update, targets, pair.path(k), version)))
            if count > 1 and "two phases" in name:
                skews.append(commit_skew(urls))
            pair.check(name, targets, k)


def commit_skew(urls: list[str]) -> float:
    times = [httpx.get(f"{u}/model_info", timeout=30).json()["ckpt_plugin"]["staging"]["committed_at"] for u in urls]
    return max(times) - min(times)


def main() -> int:
    p = bench_parser(__doc__, repeats=2)
    p.add_argument("--read-rate", default="300M", help="per-rank read limit for the staging rows (bytes/s)")
    a = p.parse_args()
    keep = a.workdir is not None
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-bench2-"))
    pair = checkpoint_pair(work, a.gb)
    ckpt = pair.path(0)
    nbytes = checkpoint_bytes(ckpt)
    copy = ["--transfer", "copy"]
    methods = {  # name -> (servers it updates: 1 or 2, update(urls, checkpoint, version))
        "SGLang /update_weights_from_disk": (1, lambda u, c, v: time_disk_update(u[0], c, v)),
        "1 rank, two phases, page cache (CLI default)": (1, lambda u, c, v: run_all([loader_cmd(u[0], c, v, [])])),
        "1 rank, two phases, shm buffers": (1, lambda u, c, v: run_all([loader_cmd(u[0], c, v, copy)])),
        "1 rank, streaming (--two-phase off), page cache": (
            1,
            lambda u, c, v: run_all([loader_cmd(u[0], c, v, ["--two-phase", "off"])]),
        ),
        "2 ranks (p2p into one server), two phases": (
            1,
            lambda u, c, v: run_all([loader_cmd(u[0], c, v, [], ranks=2)]),
        ),
        "2 ranks, streaming": (
            1,
            lambda u, c, v: run_all([loader_cmd(u[0], c, v, ["--two-phase", "off"], ranks=2)]),
        ),
        "SGLang /update_weights_from_disk on both instances at once": (2, lambda u, c, v: Fleet(u).disk(v, c)),
        "fleet of 2 instances (2 nodes, broadcast), two phases": (
            2,
            lambda u, c, v: run_all(fleet_cmds(u, c, v, [])),
        ),
        "fleet of 2 instances, streaming": (2, lambda u, c, v: run_all(fleet_cmds(u, c, v, ["--two-phase", "off"]))),
    }
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    skews: list[float] = []
    # An idle SGLang scheduler on CPU spins on one core: with two servers up, this 2-core machine has no core left
    # for anything else. So the one-server rows run with one server up; the second joins for the fleet rows.
    servers = [SGLangServer(ckpt, work / f"server{i}.log", extra_args=SERVER_ARGS) for i in range(2)]
    staging: dict[int, float | None] = {}
    try:
        servers[0].start()
        servers[0].wait_listening(timeout_s=900)
        urls = [servers[0].url]
        run_all([loader_cmd(urls[0], ckpt, "initial", ["--timeout", "900"])])
        servers[0].wait_healthy(timeout_s=300)
        pair.record(urls[:1])  # SGLang's own reloads of B and A: the references; leaves A served
        single = {name: m for name, m in methods.items() if m[0] == 1}
        fleet = {name: m for name, m in methods.items() if m[0] == 2}
        rounds(pair, single, urls, a.repeats, rows, skews)
        print("staging under a per-rank read limit...", flush=True)
        env = {**os.environ, "SGLANG_CKPT_READ_RATE": a.read_rate}
        for ranks in (1, 2):
            k = pair.next_index(urls)
            outs = run_all([loader_cmd(urls[0], pair.path(k), f"slow-{ranks}", copy, ranks=ranks)], env=env)
            pair.check(f"{ranks} rank(s) under a read limit", urls, k)
            staging[ranks] = figure(outs[0], "stage (the server kept serving)")
        print("second server for the fleet rows...", flush=True)
        servers[1].start()
        servers[1].wait_listening(timeout_s=900)
        urls.append(servers[1].url)
        k = pair.next_index(urls[:1])
        run_all(fleet_cmds(urls, pair.path(k), "fleet-initial", ["--timeout", "900"]))
        servers[1].wait_healthy(timeout_s=300)
        pair.check("the fleet's first push", urls, k)
        rounds(pair, fleet, urls, a.repeats, rows, skews)
    finally:
        for srv in servers:
            srv.stop()
    bad = pair.mismatches
    staging = staging or {1: None, 2: None}

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    disk = {1: "SGLang /update_weights_from_disk", 2: "SGLang /update_weights_from_disk on both instances at once"}
    print(f"\n{nbytes / GB:.3f} GB bf16 checkpoint, page cache warm, median of {a.repeats}, same run, same servers\n")
    print(
        "| method | idle latency s | pause s (longest request during the update) | whole update s | "
        "pause vs SGLang disk pause | pause vs SGLang disk reload time |\n|---|---|---|---|---|---|"
    )
    print(
        "(fleet rows: against SGLang's disk reload on both instances at once; one-server rows ran with one server up)"
    )
    for name, (count, _) in methods.items():
        pause, base = med(name, "pause"), disk[count]
        print(
            f"| {name} | {med(name, 'idle'):.3f} | {pause:.3f} | {med(name, 'whole'):.3f} | "
            f"{pause / med(base, 'pause'):.2f} | {pause / med(base, 'whole'):.2f} |"
        )
    split = [n for n in methods if all("while_staging" in r for r in rows[n])]
    if split:
        print(
            "\n| two phases: where the pause falls | longest latency, requests sent while staging | "
            "requests sent from staged to committed (the commit) |\n|---|---|---|"
        )
        for name in split:
            print(f"| {name} | {med(name, 'while_staging'):.3f} | {med(name, 'staged_to_end'):.3f} |")
    if skews:
        print(
            "\ncommit skew across the 2 instances (committed_at, /model_info): "
            f"median {statistics.median(skews) * 1e3:.1f} ms, max {max(skews) * 1e3:.1f} ms (target <= 100 ms)"
        )
    if staging[1] and staging[2]:
        rate1, rate2 = nbytes / GB / staging[1], nbytes / GB / staging[2]
        print(
            f"\n| staging, each rank reading at most {a.read_rate}B/s | stage s | GB/s | vs 1 rank |\n|---|---|---|---|"
        )
        print(f"| 1 rank | {staging[1]:.3f} | {rate1:.3f} | 1.00 |")
        print(
            f"| 2 ranks (each reads its half at once, then they exchange) | {staging[2]:.3f} | {rate2:.3f} | "
            f"{rate2 / rate1:.2f} (target >= 1.7) |"
        )
    targets = []
    if skews:
        targets.append(Target("commit skew across the 2 instances, worst", max(skews) * 1e3, 100.0, unit="ms"))
    if staging[1] and staging[2]:
        targets.append(
            Target("staging under a read limit: 2 ranks' rate / 1 rank's", staging[1] / staging[2], 1.7, False, "x")
        )
    print_verdicts("two phases", targets)
    print(f"\n{pair.verdict()}")
    if not keep and not bad:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
