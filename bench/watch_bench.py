"""``make bench``: the resident loader (``--watch DIR``) against SGLang's own disk reload, same run.

"whole" for the resident loader is what a trainer waits for: from the moment a checkpoint directory is complete
in the watched directory (its files hard-linked in at once: the page cache is warm, as right after a trainer
wrote it) until every instance reports its version (``/model_info`` polled every 20 ms). SGLang's row is its
``/update_weights_from_disk`` of the same files (on both servers at once for the fleet). "refill" is a server
killed and restarted on dummy weights: from its ``/model_info`` first answering until it serves the checkpoint the
loader serves. Every update writes the checkpoint the servers do not serve (A and B in turn, bench/alternation.py)
and must leave SGLang's ``/weights_checker`` checksum equal to the one after its own disk reload of that checkpoint.
Servers run with ``--sleep-on-idle``; the loader with its defaults (``--poll-s 0.25``; a checkpoint counts as
settled once unchanged between two scans).

    python bench/watch_bench.py [--gb 1.0] [--repeats 3] [--workdir DIR] [--settings single,fleet,...]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from alternation import Alternation  # noqa: E402
from baselines import GB, bench_parser, serving_servers  # noqa: E402
from node_bench import Fleet  # noqa: E402
from push_bench import checkpoint_bytes, checkpoint_pair, warm_page_cache  # noqa: E402
from targets import Target, print_verdicts  # noqa: E402

from sglang_ckpt_plugin.demo.evidence import checksum  # noqa: E402
from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port  # noqa: E402
from sglang_ckpt_plugin.loader.cli import torchrun_command  # noqa: E402


def version_of(url: str) -> str | None:
    try:
        info = httpx.get(f"{url}/model_info", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    return info.get("weight_version") if info["ckpt_plugin"]["weights_state"] == "complete" else None


def wait_serving(urls: list[str], version: str, loaders: list[subprocess.Popen], timeout_s: float = 600.0) -> float:
    t0 = time.perf_counter()
    while not all(version_of(url) == version for url in urls):
        if time.perf_counter() - t0 > timeout_s or any(p.poll() is not None for p in loaders):
            raise RuntimeError(f"{urls} did not serve {version} (a loader exited, or {timeout_s:g} s passed)")
        time.sleep(0.02)
    return time.perf_counter()


def link_checkpoint(src: Path, dst: Path) -> None:
    """A complete step directory in one go: every file hard-linked (same pages, nothing copied)."""
    tmp = dst.with_name(f".{dst.name}")
    tmp.mkdir()
    for f in src.iterdir():
        os.link(f, tmp / f.name)
    os.rename(tmp, dst)


def start_loaders(urls: list[str], watched: Path, log: Path, extra: list[str]) -> list[subprocess.Popen]:
    """One resident loader for one server; one torchrun rank per node for a fleet. Returns once it watches."""
    args = ["-m", "sglang_ckpt_plugin.update", "--watch", str(watched), "--quiet", *extra]
    out = open(log, "w")
    if len(urls) == 1:
        return [
            subprocess.Popen(
                [sys.executable, *args, "--endpoint", urls[0]], stdout=out, stderr=out, start_new_session=True
            )
        ]
    port, procs = free_port(), []
    for node, url in enumerate(urls):
        cmd = torchrun_command([*args[2:], "--endpoint", url], port=port, nnodes=len(urls), node_rank=node)
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True))
    return procs


def wait_watching(log: Path, loaders: list[subprocess.Popen]) -> None:
    """Started, placed and watching (a torchrun group takes seconds to start: not part of an update)."""
    while "[sglang-ckpt watch] watching" not in log.read_text():
        if any(p.poll() is not None for p in loaders):
            raise RuntimeError(f"the resident loader exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


SETTINGS = {  # name: (servers, loader options, what it is)
    "single": (1, [], "one TP=1 server, one loader process"),
    "fleet": (2, [], "2 nodes: each reads half, the halves cross between them"),
    "fleet-map": (2, ["--transfer", "map"], "2 nodes, each maps the files itself (--transfer map)"),
}


def bench(setting: str, servers: list[SGLangServer], pair: Alternation, work: Path, repeats: int) -> list[tuple]:
    """Each round: SGLang's disk reload of one checkpoint (timed), then the other one appears in the watched
    directory (the resident loader's update, timed), then a server restarts and is refilled; after each, SGLang's
    checksums must be those of its own reload of the checkpoint that should be served."""
    urls = [s.url for s in servers]
    fleet = Fleet(urls)
    watched, log = work / f"watched-{setting}", work / f"watch-{setting}.log"
    shutil.rmtree(watched, ignore_errors=True)
    watched.mkdir()
    pair.record(urls)  # checksums of A and B after SGLang's own reloads; leaves every server on A
    loaders = start_loaders(urls, watched, log, SETTINGS[setting][1])
    disk, resident, refill = [], [], []
    try:
        wait_watching(log, loaders)
        for i in range(repeats):
            print(f"{setting}: round {i + 1}/{repeats}", flush=True)
            k = pair.next_index(urls)
            warm_page_cache(pair.path(k))
            t0 = time.perf_counter()
            fleet.disk(f"step-{i}" if i else "initial", pair.path(k))
            disk.append(time.perf_counter() - t0)
            pair.check("SGLang's disk reload", urls, k)
            version, k = f"step-{i + 1}", pair.next_index(urls)
            warm_page_cache(pair.path(k))
            t0 = time.perf_counter()
            link_checkpoint(pair.path(k), watched / version)
            resident.append(wait_serving(urls, version, loaders) - t0)
            pair.check("the resident loader's update", urls, k)
            restarted = servers[-1]
            restarted.stop()
            restarted.start()
            while not _answers(restarted.url):
                time.sleep(0.02)
            t_port = time.perf_counter()
            refill.append(wait_serving([restarted.url], version, loaders) - t_port)
            wait_serving(urls, version, loaders)
            pair.check("the refill of a restarted server", [restarted.url], k)
    finally:
        for p in loaders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        for p in loaders:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    med = statistics.median
    return [(setting, med(disk), med(resident), med(refill))]


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/model_info", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    p = bench_parser(__doc__, repeats=3)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-watch-bench-"))
    pair = checkpoint_pair(work, a.gb)
    pair.observe = checksum  # SGLang's /weights_checker: every parameter
    ckpt = pair.path(0)
    rows = []
    for setting in a.settings.split(","):
        logs = [work / f"{setting}-server{i}.log" for i in range(SETTINGS[setting][0])]
        with serving_servers(ckpt, logs) as servers:
            rows += bench(setting, servers, pair, work, a.repeats)

    print(
        f"\n{checkpoint_bytes(ckpt) / GB:.3f} GB bf16 checkpoint, servers with --sleep-on-idle, median of {a.repeats}, "
        "same run\n"
    )
    print(
        "| setting | SGLang disk reload s | resident: complete -> serving s | minus disk s | restarted server: "
        "port answering -> serving s |"
    )
    print("|---|---|---|---|---|")
    for setting, disk, resident, refill in rows:
        print(f"| {SETTINGS[setting][2]} | {disk:.3f} | {resident:.3f} | {resident - disk:+.3f} | {refill:.3f} |")
    targets = []
    for setting, disk, resident, refill in rows:
        targets.append(Target(f"{setting}: resident complete -> serving, minus the disk reload", resident - disk, 1.0))
        targets.append(Target(f"{setting}: restarted server, port answering -> serving", refill, 2.0))
    print_verdicts("issue 19", targets)
    print(f"\n{pair.verdict()}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if pair.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
