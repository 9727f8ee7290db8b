"""``make bench``: every way of getting a generated ~1 GB bf16 checkpoint into one running SGLang server,
measured in the same run on the same server: memcpy floor, SGLang's ``/update_weights_from_disk`` and
``update_weights_from_tensor`` (fresh tensors), our push with 1 and 2 loader ranks, our trainer pushes
(same-node shared memory, and torch.distributed); loader peak RSS, scheduler RSS growth, time to ready for an
``auto`` start vs ``dummy`` + push, and push time against checkpoint size.

    python bench/push_bench.py [--gb 1.0] [--repeats 3] [--sizes 0.25,2] [--workdir DIR]

Every figure is a median over ``--repeats`` rounds, methods interleaved within a round so machine noise hits
all alike; the page cache is warmed first. Every update writes the checkpoint the server does not serve (A and B
in turn, bench/alternation.py), and the greedy output after it must equal the output after SGLang's own disk
reload of that checkpoint, or the bench fails.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port
from sglang_ckpt_plugin.demo.tiny_model import model_config, word_tokenizer
from sglang_ckpt_plugin.loader.cli import torchrun_command

sys.path.insert(0, str(Path(__file__).parent))
from alternation import Alternation  # noqa: E402
from baselines import (  # noqa: E402
    GB,
    SERVER_ARGS,
    RssSampler,
    bench_parser,
    import_baseline_rss,
    measure_pause,
    run_loader,
    scheduler_pid,
    startup_load_weight_s,
    time_disk_update,
    time_memcpy,
    time_to_ready_auto,
    time_update_from_tensor,
)
from targets import Target, print_verdicts  # noqa: E402


def make_random_checkpoint(
    out: Path, target_gb: float, shard_gb: float = 0.3, seed: int = 0, hidden: int = 2048, vocab: int = 32000
) -> Path:
    """A random bf16 Llama of about ``target_gb`` (hidden 2048, vocab 32000 unless given; layers to fit), in
    shards."""
    from transformers import AutoModelForCausalLM

    intermediate = hidden * 11 // 4
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate  # attention + MLP parameters
    layers = max(1, round((target_gb * GB / 2 - 2 * vocab * hidden) / per_layer))
    config = model_config(
        "llama",
        hidden,
        layers,
        vocab,
        torch.bfloat16,
        tie=False,
        intermediate_size=intermediate,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += t.nbytes
        if shard_bytes >= shard_gb * GB:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    word_tokenizer(vocab).save_pretrained(out)
    config.save_pretrained(out)
    return out


def random_checkpoint(work: Path, gb: float, seed: int = 0, **shape) -> Path:
    """``work/random-llama-<gb>gb`` (seed 0; ``-s<seed>`` otherwise; the shape's sizes if not the default), made
    once (config.json is written last) and reused by every bench. ``shape``: make_random_checkpoint's hidden,
    vocab."""
    sizes = "".join(f"-{k[0]}{v}" for k, v in sorted(shape.items()))
    ckpt = work / (f"random-llama-{gb:g}gb{sizes}" + (f"-s{seed}" if seed else ""))
    if not (ckpt / "config.json").exists():
        print(f"making a random bf16 checkpoint of ~{gb:g} GB in {ckpt} ...", flush=True)
        make_random_checkpoint(ckpt, gb, seed=seed, **shape)
    return ckpt


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """A trainer's weights: the checkpoint's tensors in private memory, materialized."""
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update({k: v.clone() for k, v in load_file(f).items()})
    return tensors


def checkpoint_pair(work: Path, gb: float, with_tensors: bool = False, **shape) -> Alternation:
    """Checkpoints A (seed 0) and B (seed 1) of one shape, for benches that update with each in turn."""
    paths = (random_checkpoint(work, gb, **shape), random_checkpoint(work, gb, seed=1, **shape))
    return Alternation(paths, tuple(load_tensors(p) for p in paths) if with_tensors else None)


def checkpoint_bytes(path: Path) -> int:
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint

    return sum(t.nbytes for t in read_checkpoint(path))


def warm_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def loader_cmd(url: str, ckpt: Path, version: str, extra: list[str], ranks: int = 1) -> list[str]:
    args = ["--checkpoint-path", str(ckpt), "--endpoint", url, "--weight-version", version, "--quiet", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "sglang_ckpt_plugin.update", *args]
    # a tp=1 server fed by 2 loader ranks: each reads half, rank 1 sends its half to rank 0 (p2p, over gloo)
    return torchrun_command(["--update-method", "p2p", "--ranks", "0", *args], port=free_port(), nproc_per_node=ranks)


def time_push(url: str, ckpt: Path, version: str, extra: list[str], ranks: int = 1, sampler_pid=None) -> dict:
    with RssSampler(sampler_pid) as rss:
        proc, process_s, loader_rss = run_loader(loader_cmd(url, ckpt, version, extra, ranks))
    out = proc.stdout
    stage = re.search(
        r"read ([\d.]+) s \| wait for server ([\d.]+) s \| server load ([\d.]+) s \| "
        r"server post-process ([\d.]+) s",
        out,
    )
    buffers = re.search(r"buffers ([\d.]+) s", out)
    finalize = re.search(r"server finalize ([\d.]+) s", out)
    return {
        "push_s": float(re.search(r"GB in ([\d.]+) s", out).group(1)),
        "wall_s": float(re.search(r"wall ([\d.]+) s", out).group(1)),
        "process_s": process_s,
        "read_s": float(stage.group(1)),
        "wait_s": float(stage.group(2)),
        "load_s": float(stage.group(3)),
        "post_s": float(stage.group(4)),
        "buffers_s": float(buffers.group(1)) if buffers else 0.0,
        "finalize_s": float(finalize.group(1)) if finalize else 0.0,
        "buckets": int(re.search(r"pushed (\d+) buckets", out).group(1)),
        "loader_rss": loader_rss,
        "sched_anon": rss.growth("RssAnon"),
        "sched_rss": rss.growth("VmRSS"),
        "bytes_per_rank": re.search(r"bytes read from disk per rank: (.*)", out).group(1),
    }


def size_scaling(
    work: Path, sizes: list[float], extra: list[str]
) -> tuple[list[tuple[float, float, float]], list[str]]:
    """(GB, push seconds, GB/s) for other checkpoint sizes, each on its own server (warm cache, A and B in turn),
    and what any push left wrong."""
    rows, wrong = [], []
    for gb in sizes:
        pair = checkpoint_pair(work, gb)
        nbytes = checkpoint_bytes(pair.path(0))
        with SGLangServer(pair.path(0), work / f"server-{gb:g}.log", extra_args=SERVER_ARGS) as srv:
            srv.wait_listening(timeout_s=900)
            time_push(srv.url, pair.path(0), "first", extra)
            srv.wait_healthy(timeout_s=900)
            pair.record([srv.url])
            times = []
            for i in range(2):
                k = pair.next_index([srv.url])
                warm_page_cache(pair.path(k))
                times.append(time_push(srv.url, pair.path(k), f"size-{i}", extra)["push_s"])
                pair.check(f"push of {gb:g} GB", [srv.url], k)
        rows.append((nbytes / GB, statistics.median(times), nbytes / GB / statistics.median(times)))
        wrong += pair.mismatches
    return rows, wrong


def main() -> int:
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.loader.plan import auto_bucket_size
    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    p = bench_parser(__doc__, repeats=3)
    p.add_argument("--sizes", default="0.25,2", help="other checkpoint sizes (GB) for the scaling series; '' skips")
    p.add_argument("--loader-args", default="", help="extra loader arguments, e.g. '--bucket-size 128M'")
    a = p.parse_args()
    extra = a.loader_args.split()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-bench-"))
    pair = checkpoint_pair(work, a.gb, with_tensors=True)
    ckpt = pair.path(0)
    nbytes = checkpoint_bytes(ckpt)
    warm_page_cache(ckpt)
    print(f"checkpoint: {nbytes / GB:.3f} GB of tensors (A and B); memcpy and import baselines...", flush=True)
    memcpy_1t = time_memcpy(nbytes, a.repeats + 2, threads=1)
    memcpy_nt = time_memcpy(nbytes, a.repeats + 2, threads=torch.get_num_threads())
    base_rss = import_baseline_rss()

    print("starting SGLang (dummy weights, waiting for a push)...", flush=True)
    r = {k: [] for k in ("disk", "push", "copy", "push2", "tensor", "local", "trainer")}
    log = work / "server.log"
    srv = SGLangServer(ckpt, log, extra_args=SERVER_ARGS)
    t_start = time.perf_counter()
    with srv:
        url = srv.url
        # as a user starts them: server and loader together; the loader waits until the server listens
        loader = subprocess.Popen(
            loader_cmd(url, ckpt, "initial", [*extra, "--timeout", "900"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = loader.communicate(timeout=900)
        if loader.returncode != 0:
            raise RuntimeError(f"initial push failed: {out}\n{err}")
        first = {"push_s": float(re.search(r"GB in ([\d.]+) s", out).group(1))}
        srv.wait_healthy(timeout_s=900)
        ready_dummy_s = time.perf_counter() - t_start
        dummy_load_s = startup_load_weight_s(log)
        sched = scheduler_pid(srv.proc.pid)
        pair.record([url])  # SGLang's own reloads of B and A: the references; leaves A served

        def turn(method: str, update, version: str):
            """One timed update with the checkpoint not served now; then it must serve exactly that one."""
            k = pair.next_index([url])
            warm_page_cache(pair.path(k))
            result = update(pair.path(k), pair.tensors[k], version)
            pair.check(method, [url], k)
            return result

        local = LocalPush(url, bucket_bytes=auto_bucket_size(read_checkpoint(ckpt)))  # same buckets as the loader
        local_first = turn("LocalPush, first", lambda _, t, v: local.push(t.items(), weight_version=v), "local-first")
        local_first = local_first.seconds
        trainer = TrainerPush(url).connect()
        copy = [*extra, "--transfer", "copy"]
        methods = {  # r's key: (name, update(checkpoint, its tensors, version))
            "disk": ("disk reload", lambda c, _, v: time_disk_update(url, c, v)),
            "push": ("push", lambda c, _, v: time_push(url, c, v, extra, sampler_pid=sched)),
            "copy": ("push, bucket buffers", lambda c, _, v: time_push(url, c, v, copy, sampler_pid=sched)),
            "push2": ("push, 2 loader ranks", lambda c, _, v: time_push(url, c, v, extra, ranks=2)),
            "tensor": ("update_weights_from_tensor", lambda _, t, v: time_update_from_tensor(url, t, v)),
            "local": ("local push", lambda _, t, v: local.push(t.items(), weight_version=v).seconds),
            "trainer": ("trainer push", lambda _, t, v: trainer.push(t.items(), weight_version=v).seconds),
        }
        for i in range(a.repeats):
            print(f"round {i + 1}/{a.repeats}", flush=True)
            for key, (name, update) in methods.items():
                r[key].append(turn(name, update, f"{key}-{i}"))
        # what a client sees: a 1-token request every 50 ms while each method updates (groundwork for issue 11)
        print("measuring the pause clients see during updates...", flush=True)
        probes = {
            "SGLang /update_weights_from_disk": lambda c, _, v: time_disk_update(url, c, v),
            "our push, 1 rank, page cache (CLI)": lambda c, _, v: run_loader(loader_cmd(url, c, v, extra)),
            "our push, 1 rank, shm bucket buffers (CLI)": lambda c, _, v: run_loader(loader_cmd(url, c, v, copy)),
            "LocalPush (shm buckets, reused)": lambda _, t, v: local.push(t.items(), weight_version=v),
        }
        pauses = {
            name: turn(name, lambda c, t, v, u=update: measure_pause(url, lambda: u(c, t, v)), f"pause-{n}")
            for n, (name, update) in enumerate(probes.items())
        }
        trainer.close()
        local.close()
    if pair.mismatches:
        print(pair.verdict(), file=sys.stderr)
        return 1

    help_s = statistics.median(
        run_loader([sys.executable, "-m", "sglang_ckpt_plugin.update", "--help"])[1] for _ in range(5)
    )
    torch_import_s = statistics.median(run_loader([sys.executable, "-c", "import torch"])[1] for _ in range(3))
    print("timing a plain --load-format auto start...", flush=True)
    ready_auto_s = time_to_ready_auto(ckpt, work / "server-auto.log")
    auto_load_s = startup_load_weight_s(work / "server-auto.log")
    sizes = [float(x) for x in a.sizes.split(",") if x.strip()]
    scaling, wrong = size_scaling(work, sizes, extra) if sizes else ([], [])
    if wrong:
        print("MISMATCH:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1

    def med(rows, key):
        return statistics.median(x[key] for x in rows)

    disk_s, tensor_s = statistics.median(r["disk"]), statistics.median(r["tensor"])
    rows = [
        ("memcpy, pre-faulted buffers, 1 thread", memcpy_1t),
        (f"memcpy, pre-faulted buffers, {torch.get_num_threads()} threads", memcpy_nt),
        ("SGLang /update_weights_from_disk (HTTP call)", disk_s),
        ("SGLang update_weights_from_tensor, fresh tensors (HTTP)", tensor_s),
        ("our push, 1 rank, page cache: hello to last ack", med(r["push"], "push_s")),
        ("our push, 1 rank, page cache: wall after imports", med(r["push"], "wall_s")),
        ("our push, 1 rank, page cache: whole CLI process", med(r["push"], "process_s")),
        ("our push, 1 rank, shm bucket buffers: hello to last ack", med(r["copy"], "push_s")),
        ("our push, 1 rank, shm bucket buffers: wall after imports", med(r["copy"], "wall_s")),
        ("our push, 2 loader ranks (torchrun, p2p, gloo): hello to last ack", med(r["push2"], "push_s")),
        ("our push, 2 loader ranks: whole torchrun process", med(r["push2"], "process_s")),
        ("our push into unfilled dummy weights (first push)", first["push_s"]),
        ("trainer, same node: LocalPush (shm buckets, reused)", statistics.median(r["local"])),
        ("trainer, same node: LocalPush, first push (allocates)", local_first),
        ("trainer: TrainerPush (torch.distributed gloo, SGLang path)", statistics.median(r["trainer"])),
    ]
    print(f"\n{nbytes / GB:.3f} GB bf16 checkpoint, page cache warm, median of {a.repeats}, same run, same server\n")
    print(f"| {'method':58} | seconds | GB/s  | vs memcpy 1t | vs SGLang disk | vs SGLang tensor |")
    print(f"|{'-' * 60}|---------|-------|--------------|----------------|------------------|")
    for name, s in rows:
        print(
            f"| {name:58} | {s:7.3f} | {nbytes / GB / s:5.2f} | {memcpy_1t / s:12.2f} | {disk_s / s:14.2f} | "
            f"{tensor_s / s:16.2f} |"
        )
    push, copy = r["push"], r["copy"]
    bucket = nbytes / max(copy[0]["buckets"], 1)
    mb = 1 << 20
    for name, rows_ in (("page cache", push), ("shm bucket buffers", copy)):
        print(
            f"\npush stages, {name} (median): read {med(rows_, 'read_s'):.3f} s, loader waiting for server "
            f"{med(rows_, 'wait_s'):.3f} s, server load_weights {med(rows_, 'load_s'):.3f} s, post-process "
            f"{med(rows_, 'post_s'):.3f} s, buffer allocation {med(rows_, 'buffers_s'):.3f} s, "
            f"{rows_[0]['buckets']} buckets (~{nbytes / rows_[0]['buckets'] / mb:.0f} MiB)"
        )
    print(f"2 loader ranks, bytes read from disk: {r['push2'][0]['bytes_per_rank']}")
    overhead = statistics.median(x["process_s"] - x["push_s"] - x["finalize_s"] for x in push)
    cli_targets = [
        Target(
            "CLI start-up: whole process minus the server-side update (hello to last ack + finalize)", overhead, 0.3
        ),
        Target("`python -m sglang_ckpt_plugin.update --help`", help_s, 0.3),
    ]
    print_verdicts("CLI start-up (1 rank, CPU, page cache: no torch)", cli_targets)
    print(f"(`python -c 'import torch'`, what the page-cache path no longer pays: {torch_import_s:.3f} s)")
    print("\n| memory | MiB | in buckets |\n|---|---|---|")
    print(f"| import-only baseline RSS (Python + torch + loader) | {base_rss / mb:.0f} | {base_rss / bucket:.2f} |")
    for name, rows_ in (("page cache", push), ("shm bucket buffers", copy)):
        over = med(rows_, "loader_rss") - base_rss
        peak = med(rows_, "loader_rss")
        print(f"| {name}: loader peak RSS | {peak / mb:.0f} | {peak / bucket:.2f} |")
        print(f"| {name}: loader RSS above the baseline | {over / mb:.0f} | {over / bucket:.2f} |")
        print(
            f"| {name}: scheduler RSS growth during a push (incl. mapped shared pages) | "
            f"{med(rows_, 'sched_rss') / mb:.0f} | {med(rows_, 'sched_rss') / bucket:.2f} |"
        )
        print(
            f"| {name}: scheduler private (anon) RSS growth | {med(rows_, 'sched_anon') / mb:.0f} | "
            f"{med(rows_, 'sched_anon') / bucket:.2f} |"
        )
    print("\n| start | seconds to /health 200 | SGLang load_weight inside the start |\n|---|---|---|")
    print(f"| --load-format auto | {ready_auto_s:.1f} | {auto_load_s} |")
    dummy_row = "--load-format dummy --wait-for-initial-weights, loader started with it"
    print(f"| {dummy_row} | {ready_dummy_s:.1f} | {dummy_load_s} |")
    if scaling:
        one = (nbytes / GB, med(push, "push_s"), nbytes / GB / med(push, "push_s"))
        print("\n| checkpoint GB | push s (buckets only) | GB/s |\n|---|---|---|")
        for gb, s, rate in sorted([*scaling, one]):
            print(f"| {gb:.2f} | {s:.3f} | {rate:.2f} |")
    disk_pause = pauses["SGLang /update_weights_from_disk"][1]
    print(
        "\n| pause a client sees (1-token /generate every 50 ms) | idle latency s | longest latency during "
        "the update s | update s (caller's view) | pause vs SGLang disk |\n|---|---|---|---|---|"
    )
    for name, (idle, pause, took) in pauses.items():
        print(f"| {name} | {idle:.3f} | {pause:.3f} | {took:.3f} | {pause / disk_pause:.2f} |")
    print(f"\n{pair.verdict()}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)  # GBs of generated checkpoints; --workdir keeps (and reuses) them
    return 0


if __name__ == "__main__":
    sys.exit(main())
