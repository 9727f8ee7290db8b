"""``make bench`` (first table): what a caller waits for and what clients see, for every way of updating one node's
server, TP=1 and TP=2, against SGLang's own ``/update_weights_from_disk`` of the same files in the same run.

Every server runs with SGLang's ``--sleep-on-idle`` (an idle scheduler otherwise spins a core and every figure
measures that). "whole" is the caller's time for the update, measured alone: for the CLI the whole process,
start-up included; "pause" is the longest latency of 1-token requests sent every 250 ms while the same update ran
again. Methods are interleaved in each round, medians over ``--repeats``; the page cache is warm. After each
method SGLang's ``/weights_checker`` checksum must equal the one after its own disk reload (the same bytes), or
the bench fails.

    python bench/node_bench.py [--gb 1.0] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from baselines import (  # noqa: E402
    GB,
    SERVER_ARGS,
    bench_parser,
    measure_pause,
    run_loader,
    time_disk_update,
    time_update_from_tensor,
)
from push_bench import checkpoint_bytes, random_checkpoint, warm_page_cache  # noqa: E402

from sglang_ckpt_plugin.demo.evidence import checksum  # noqa: E402
from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port  # noqa: E402

PROBE_EVERY_S = 0.25  # a 1-token request of this model takes ~0.1 s on 2 cores: a faster probe queues


def cli(url: str, ckpt: Path, version: str, *extra: str, tp: int = 1) -> list[str]:
    args = ["--checkpoint-path", str(ckpt), "--endpoint", url, "--weight-version", version, "--quiet"]
    return [sys.executable, "-m", "sglang_ckpt_plugin.update", *args, "--inference-parallel-size", str(tp), *extra]


def torchrun(url: str, ckpt: Path, version: str, tp: int) -> list[str]:
    """One loader rank per TP rank (what a GPU server or several nodes take), on one node."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp)]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [*launcher, *rendezvous, *cli(url, ckpt, version, tp=tp)[1:]]


class Methods:
    """The update methods of one server; each returns what its run printed (for the bytes it moved)."""

    def __init__(self, url: str, ckpt: Path, tp: int, tensors: dict, torchrun_too: bool):
        from sglang_ckpt_plugin.local_push import LocalPush

        self.url, self.ckpt, self.tp, self.tensors = url, ckpt, tp, tensors
        self.local = LocalPush(url)
        self.methods = {
            "SGLang /update_weights_from_disk": self.disk,
            "push, page cache (one loader process)": self.cli,
            "push, shared bucket buffers (one process)": lambda v: self.cli(v, "--transfer", "copy"),
        }
        if torchrun_too:
            self.methods[f"push, {tp} loader ranks (torchrun, one node)"] = self.torchrun
        self.methods["SGLang update_weights_from_tensor (HTTP, fresh tensors)"] = self.tensor
        self.methods["LocalPush (trainer memory, shm buffers kept)"] = self.local_push

    def disk(self, version: str) -> str:
        time_disk_update(self.url, self.ckpt, version)
        return ""

    def cli(self, version: str, *extra: str) -> str:
        return run_loader(cli(self.url, self.ckpt, version, *extra, tp=self.tp))[0].stdout

    def torchrun(self, version: str) -> str:
        return run_loader(torchrun(self.url, self.ckpt, version, self.tp))[0].stdout

    def tensor(self, version: str) -> str:
        time_update_from_tensor(self.url, self.tensors, version, self.tp, flush_cache=False)
        return ""

    def local_push(self, version: str) -> str:
        self.local.push(self.tensors.items(), weight_version=version)
        return ""


def moved_bytes(out: str) -> str:
    found = re.search(r"between loader processes: (\d+) bytes", out or "")
    return f"{int(found.group(1)) / 1e6:.0f} MB" if found else "-"


def bench_server(tp: int, ckpt: Path, work: Path, tensors: dict, repeats: int) -> list[tuple]:
    """Each method twice a round: alone (what the caller waits for), then under the request probe (the pause)."""
    rows: dict[str, dict] = {}
    with SGLangServer(ckpt, work / f"server-tp{tp}.log", tp_size=tp, extra_args=SERVER_ARGS) as srv:
        srv.wait_listening(timeout_s=900)
        time_disk_update(srv.url, ckpt, "initial")  # real weights in, the gate open
        srv.wait_healthy(timeout_s=300)
        reference = checksum(srv.url)
        methods = Methods(srv.url, ckpt, tp, tensors, torchrun_too=tp > 1)
        try:
            for i in range(repeats):
                print(f"TP={tp}: round {i + 1}/{repeats}", flush=True)
                for name, update in methods.methods.items():
                    row = rows.setdefault(name, {"whole": [], "pause": [], "idle": [], "moved": "-"})
                    warm_page_cache(ckpt)
                    t0 = time.perf_counter()
                    row["moved"] = moved_bytes(update(f"r{i}"))
                    row["whole"].append(time.perf_counter() - t0)
                    warm_page_cache(ckpt)
                    idle, pause, _ = measure_pause(srv.url, lambda: update(f"p{i}"), every_s=PROBE_EVERY_S)
                    row["pause"].append(pause)
                    row["idle"].append(idle)
                    if checksum(srv.url) != reference:
                        raise RuntimeError(f"TP={tp} {name}: the served weights differ from SGLang's own load")
        finally:
            methods.local.close()
    med = statistics.median
    return [(tp, name, med(r["whole"]), med(r["pause"]), med(r["idle"]), r["moved"]) for name, r in rows.items()]


def main() -> int:
    p = bench_parser(__doc__, repeats=3)
    p.add_argument("--tp", default="1,2", help="server TP sizes to measure")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-node-bench-"))
    ckpt = random_checkpoint(work, a.gb)
    nbytes = checkpoint_bytes(ckpt)
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):  # a trainer's weights: private memory
        tensors.update({k: v.clone() for k, v in load_file(f).items()})
    rows = []
    for tp in [int(x) for x in a.tp.split(",")]:
        rows += bench_server(tp, ckpt, work, tensors, a.repeats)

    header = f"{nbytes / GB:.3f} GB bf16 checkpoint, page cache warm, servers with --sleep-on-idle"
    print(f"\n{header}, median of {a.repeats}, same run\n")
    print("| TP | method | whole s | vs disk | pause s | vs disk | idle latency s | between loader processes |")
    print("|---|---|---|---|---|---|---|---|")
    disk = {tp: (w, pz) for tp, name, w, pz, _, _ in rows if name.startswith("SGLang /update_weights_from_disk")}
    for tp, name, whole, pause, idle, moved in rows:
        d_whole, d_pause = disk[tp]
        ratios = f"{whole / d_whole:.2f}x | {pause:.3f} | {pause / d_pause:.2f}x"
        print(f"| {tp} | {name} | {whole:.3f} | {ratios} | {idle:.3f} | {moved} |")
    print("\ntargets (issue 16): one-node pushes whole <= disk + 1.0 s, pause <= 1.5x disk, 0 bytes between loader "
          "processes; LocalPush >= 10x faster than update_weights_from_tensor")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
