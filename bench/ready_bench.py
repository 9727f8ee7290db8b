"""``make bench``: time to ready from a cold checkpoint, server and loader started together, against SGLang
starting on the same files (``--load-format auto``), same run.

Before every row the checkpoint's pages are dropped from the page cache (fsync + ``POSIX_FADV_DONTNEED``), so
each start reads it from storage. "ready" is launch -> ``/health`` 200 (the gate opens once the weights are
complete). The parts, measured in the same run: the server's start alone (launch -> ``/model_info`` answering, on
dummy weights), the cold read alone (the loader's reader, every file once), and the hand-over (a warm push into the
running server: the whole loader process). Target (issue 18): ready <= (max(start, read) + hand-over) x 1.1. Every
server runs with ``--sleep-on-idle``; every push must serve the checkpoint bit-exactly (``/weights_checker``).

    python bench/ready_bench.py [--gb 1.0] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from baselines import GB, SERVER_ARGS, bench_parser, run_loader, time_disk_update  # noqa: E402
from push_bench import checkpoint_bytes, loader_cmd, random_checkpoint, warm_page_cache  # noqa: E402
from read_bench import read_once_s  # noqa: E402
from targets import Target, print_verdicts  # noqa: E402

from sglang_ckpt_plugin.demo.evidence import checksum  # noqa: E402
from sglang_ckpt_plugin.demo.launch import SGLangServer  # noqa: E402
from sglang_ckpt_plugin.loader.early_read import drop_cached  # noqa: E402

ROWS = {  # key: (loader options, what the row is)
    "no-read-ahead": (["--no-read-ahead"], "dummy + loader together, no read-ahead (reads once the server answers)"),
    "read-ahead": ([], "dummy + loader together, reading while the server starts (default)"),
    "read-ahead-copy": (["--transfer", "copy"], "the same, shared bucket buffers (--transfer copy)"),
}


def drop_from_page_cache(ckpt: Path) -> None:
    for f in ckpt.iterdir():
        if drop_cached(str(f)) > 1 << 20 and f.suffix == ".safetensors":
            raise RuntimeError(f"{f} stays in the page cache after POSIX_FADV_DONTNEED: put --workdir on a disk")


def cold_read_s(ckpt: Path) -> float:
    drop_from_page_cache(ckpt)
    return read_once_s(ckpt)


def start_with_loader(ckpt: Path, log: Path, options: list[str], version: str) -> tuple[SGLangServer, dict]:
    """Server (dummy weights, waiting for them) and loader launched at the same moment; returns the running server
    and the row's figures (start: launch -> /model_info 200; ready: launch -> /health 200)."""
    drop_from_page_cache(ckpt)
    srv = SGLangServer(ckpt, log, extra_args=SERVER_ARGS)
    t0 = time.perf_counter()
    srv.start()
    loader = subprocess.Popen(
        loader_cmd(srv.url, ckpt, version, [*options, "--timeout", "900"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start_s = None
    with httpx.Client(timeout=5.0) as client:
        while True:
            try:
                if start_s is None and client.get(f"{srv.url}/model_info").status_code == 200:
                    start_s = time.perf_counter() - t0
                if client.get(f"{srv.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if loader.poll() not in (None, 0) or srv.proc.poll() is not None:
                srv.stop()
                raise RuntimeError(f"{version}: the loader or the server stopped:\n{loader.communicate()[1][-3000:]}")
            time.sleep(0.05)
    ready_s = time.perf_counter() - t0
    out, err = loader.communicate(timeout=300)
    if loader.returncode:
        srv.stop()
        raise RuntimeError(f"{version}: loader failed:\n{err[-3000:]}")
    return srv, {"start": start_s, "ready": ready_s}


def main() -> int:
    a = bench_parser(__doc__, repeats=2).parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-ready-bench-"))
    ckpt = random_checkpoint(work, a.gb)
    figures: dict[str, list[dict]] = {key: [] for key in ["auto", *ROWS]}
    sums: set[str] = set()
    for i in range(a.repeats):
        print(f"round {i + 1}/{a.repeats}", flush=True)
        drop_from_page_cache(ckpt)
        t0 = time.perf_counter()
        with SGLangServer(ckpt, work / "auto.log", wait_for_weights=False, extra_args=SERVER_ARGS) as srv:
            srv.wait_healthy(timeout_s=900)
            figures["auto"].append({"ready": time.perf_counter() - t0})
            sums.add(checksum(srv.url))
        for key, (options, _) in ROWS.items():
            srv, row = start_with_loader(ckpt, work / f"{key}.log", options, f"{key}-{i}")
            try:  # started already: stop it, never start it again (``with`` would)
                sums.add(checksum(srv.url))
                warm_page_cache(ckpt)
                row["handover"] = run_loader(loader_cmd(srv.url, ckpt, f"warm-{i}", options))[1]
                time_disk_update(srv.url, ckpt, "disk")  # SGLang's own load of the same files: the same checksum
                sums.add(checksum(srv.url))
            finally:
                srv.stop()
            figures[key].append(row)
    if len(sums) != 1:
        print(
            f"MISMATCH: /weights_checker checksums differ between SGLang's load and the pushes: {sums}", file=sys.stderr
        )
        return 1
    read_s = statistics.median(cold_read_s(ckpt) for _ in range(a.repeats))

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in figures[key])

    auto_s = med("auto", "ready")
    print(
        f"\n{checkpoint_bytes(ckpt) / GB:.3f} GB bf16 checkpoint, cold page cache before every start, servers with "
        f"--sleep-on-idle, median of {a.repeats}, same run; cold read alone {read_s:.2f} s\n"
    )
    print(
        "| start | ready s | vs SGLang auto | server start s | hand-over s | max(start, read) + hand-over s | "
        "ready / that |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| SGLang --load-format auto (reads the files itself) | {auto_s:.2f} | 1.00 | | | | |")
    targets = []
    for key, (_, name) in ROWS.items():
        ready, start, handover = med(key, "ready"), med(key, "start"), med(key, "handover")
        bound = max(start, read_s) + handover
        print(
            f"| {name} | {ready:.2f} | {ready / auto_s:.2f} | {start:.2f} | {handover:.2f} | {bound:.2f} | "
            f"{ready / bound:.2f} |"
        )
        if key != "no-read-ahead":  # the target is for reading ahead
            targets.append(
                Target(f"{name}: ready / (max(server start, read) + hand-over)", ready / bound, 1.1, unit="x")
            )
    print_verdicts("issue 18", targets)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
