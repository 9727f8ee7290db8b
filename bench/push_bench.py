"""``make bench``: push a generated ~1 GB bf16 checkpoint into a running SGLang server, and compare, in
the same run and on the same server, with SGLang's ``/update_weights_from_disk`` of the same checkpoint and
with a plain memcpy of the same bytes.

    python bench/push_bench.py [--gb 1.0] [--repeats 3] [--workdir DIR]

Every figure is a median over ``--repeats`` runs, interleaved (disk, push, disk, push...) so machine noise
hits both alike; the page cache is warmed first, so both read from memory. Greedy output after each method is
compared, as a check that both loaded the same weights.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids
from sglang_ckpt_plugin.demo.tiny_model import model_config, word_tokenizer

GB = 1e9


def make_random_checkpoint(out: Path, target_gb: float, shard_gb: float = 0.3) -> Path:
    """A random bf16 Llama of about ``target_gb`` (hidden 2048, vocab 32000, layers to fit), in shards."""
    from transformers import AutoModelForCausalLM

    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632  # attention + MLP parameters
    layers = max(1, round((target_gb * GB / 2 - 2 * 32000 * 2048) / per_layer))
    config = model_config("llama", 2048, layers, 32000, torch.bfloat16, tie=False, intermediate_size=5632,
                          num_attention_heads=16, num_key_value_heads=16)  # fmt: skip
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
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
    word_tokenizer(32000).save_pretrained(out)
    config.save_pretrained(out)
    return out


def checkpoint_bytes(path: Path) -> int:
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint

    return sum(t.nbytes for t in read_checkpoint(path))


def warm_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def time_memcpy(nbytes: int, repeats: int, threads: int) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # both pre-faulted
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(old)
    return statistics.median(times)


def time_disk_update(url: str, ckpt: Path, version: str) -> float:
    body = {"model_path": str(ckpt), "load_format": "auto", "weight_version": version}
    t0 = time.perf_counter()
    resp = httpx.post(f"{url}/update_weights_from_disk", json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200 or not resp.json().get("success"):
        raise RuntimeError(f"update_weights_from_disk failed: {resp.text[:300]}")
    return elapsed


def time_push(url: str, ckpt: Path, version: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "sglang_ckpt_plugin.update", "--checkpoint-path", str(ckpt), "--endpoint", url,
           "--weight-version", version, "--quiet", *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"loader failed: {proc.stdout}\n{proc.stderr}")
    out = proc.stdout
    stage = re.search(r"read ([\d.]+) s \| wait for server ([\d.]+) s \| server load ([\d.]+) s \| "
                      r"server post-process ([\d.]+) s", out)  # fmt: skip
    return {
        "push_s": float(re.search(r"GB in ([\d.]+) s", out).group(1)),
        "wall_s": float(re.search(r"wall ([\d.]+) s", out).group(1)),
        "process_s": process_s,
        "read_s": float(stage.group(1)),
        "wait_s": float(stage.group(2)),
        "load_s": float(stage.group(3)),
        "post_s": float(stage.group(4)),
        "buckets": int(re.search(r"pushed (\d+) buckets", out).group(1)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--loader-args", default="", help="extra loader arguments, e.g. '--bucket-size 128M'")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-bench-"))
    ckpt = work / f"random-llama-{a.gb:g}gb"
    if not (ckpt / "config.json").exists():  # written last
        print(f"making a random bf16 checkpoint of ~{a.gb:g} GB in {ckpt} ...", flush=True)
        make_random_checkpoint(ckpt, a.gb)
    nbytes = checkpoint_bytes(ckpt)
    warm_page_cache(ckpt)
    print(f"checkpoint: {nbytes / GB:.3f} GB of tensors; memcpy baseline...", flush=True)
    memcpy_1t = time_memcpy(nbytes, a.repeats + 2, threads=1)
    memcpy_nt = time_memcpy(nbytes, a.repeats + 2, threads=torch.get_num_threads())

    print("starting SGLang (dummy weights, waiting for a push)...", flush=True)
    disk, push = [], []
    with SGLangServer(ckpt, work / "server.log") as srv:
        srv.wait_listening(timeout_s=600)
        first = time_push(srv.url, ckpt, "initial", a.loader_args.split())
        srv.wait_healthy()
        prompt = list(range(10, 20))
        outputs = {}
        for i in range(a.repeats):
            warm_page_cache(ckpt)
            disk.append(time_disk_update(srv.url, ckpt, f"disk-{i}"))
            outputs["disk"] = generate_ids(srv.url, prompt, 8)["output_ids"]
            warm_page_cache(ckpt)
            push.append(time_push(srv.url, ckpt, f"push-{i}", a.loader_args.split()))
            outputs["push"] = generate_ids(srv.url, prompt, 8)["output_ids"]
    if outputs["disk"] != outputs["push"]:
        print(f"MISMATCH: disk {outputs['disk']} vs push {outputs['push']}", file=sys.stderr)
        return 1

    med = lambda key: statistics.median(r[key] for r in push)  # noqa: E731
    disk_s = statistics.median(disk)
    rows = [
        ("memcpy, pre-faulted buffers, 1 thread", memcpy_1t),
        (f"memcpy, pre-faulted buffers, {torch.get_num_threads()} threads", memcpy_nt),
        ("SGLang /update_weights_from_disk (HTTP call)", disk_s),
        ("our push: loader planning + push (wall)", med("wall_s")),
        ("our push: buckets only (first byte read to last ack)", med("push_s")),
        ("our push: whole CLI process (incl. Python/torch import)", med("process_s")),
        ("our push: first push into dummy weights (buckets only)", first["push_s"]),
    ]
    print(f"\n{nbytes / GB:.3f} GB bf16 checkpoint, page cache warm, median of {a.repeats}, same run, same server\n")
    print(f"| {'method':58} | seconds | GB/s  | vs memcpy (1 thread) | vs SGLang disk |")
    print(f"|{'-' * 60}|---------|-------|----------------------|----------------|")
    for name, s in rows:
        print(f"| {name:58} | {s:7.3f} | {nbytes / GB / s:5.2f} | {memcpy_1t / s:20.2f} | {disk_s / s:14.2f} |")
    print(f"\npush stages (median): read {med('read_s'):.3f} s, loader waiting for server {med('wait_s'):.3f} s, "
          f"server load_weights {med('load_s'):.3f} s, post-process {med('post_s'):.3f} s, {push[0]['buckets']} buckets")  # fmt: skip
    print(f"greedy output after disk reload == after push: {outputs['disk'] == outputs['push']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
