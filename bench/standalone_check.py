"""The CUDA-path check without SGLang (``scripts/device_check.sh --no-sglang``): needs torch, safetensors, xxhash,
httpx, tqdm, pyzmq and msgspec only, so it runs on a GPU machine where SGLang cannot be installed.

The real loader CLI pushes a random bf16 checkpoint into a stand-in server (bench/standin_server.py) whose update
route runs the plugin's real receiver in another process on the device, loading into a torch module; after every
variant the server's parameters must be byte-identical to the checkpoint (xxh3 of every tensor) and its device
memory back to the baseline. Variants: defaults, --verify, small buckets with --num-buffers 1, (CUDA) the loader
seeing the GPU only by UUID, expandable_segments:True, --device cpu (shared memory, the server copies), and
LocalPush of in-memory tensors (x, 2x, 3x; on CUDA the third push must not have grown the server's memory use nor
the pusher's reserved memory over the first). Then what failures leave behind (bench/leak_check.py): failed
updates, a refused LocalPush, the pinned staging chunks. TrainerPush is not here: its NCCL group needs a second GPU and
SGLang's group helper (its refusal path runs on CPU in tests/test_e2e_push.py). Prints pinned host-to-device and
device-to-device copy rates measured in the same run, push rates and their ratios. ``--device cpu`` runs the same
steps on the CPU path (test suite).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from leak_check import failed_updates, pinned_staging_row, pusher_memory_row, refused_local_push  # noqa: E402
from read_bench import copy_rate, read_once_s  # noqa: E402

from sglang_ckpt_plugin.loader.http import free_port  # noqa: E402
from sglang_ckpt_plugin.transport.integrity import tensor_digest  # noqa: E402

GB = 1e9
MEMORY_SLACK = 64 << 20  # the CUDA caching allocator's own rounding; a kept bucket buffer is far larger


def make_checkpoint(out: Path, gb: float, shard_gb: float = 0.5) -> Path:
    """Random bf16 tensors of about ``gb``, in shards: big matrices, odd-sized vectors (unaligned offsets)."""
    out.mkdir(parents=True, exist_ok=True)
    if list(out.glob("*.safetensors")):
        return out
    gen = torch.Generator().manual_seed(0)
    shard, size, index, total, i = {}, 0, 0, 0, 0
    while total + size < gb * GB:
        rows = 2048 if i % 3 else 1531  # 1531: a prime, so offsets after it are not 4 KiB aligned
        shard[f"layers.{i}.weight"] = torch.randn(rows, 4096, generator=gen).to(torch.bfloat16)
        shard[f"layers.{i}.bias"] = torch.randn(4096 + i % 7, generator=gen).to(torch.bfloat16)
        size += sum(t.numel() * 2 for t in (shard[f"layers.{i}.weight"], shard[f"layers.{i}.bias"]))
        i += 1
        if size >= shard_gb * GB:
            save_file(shard, out / f"model-{index:03d}.safetensors")
            total, shard, size, index = total + size, {}, 0, index + 1
    if shard:
        save_file(shard, out / f"model-{index:03d}.safetensors")
    return out


def file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: f"{tensor_digest(t.reshape(-1).view(torch.uint8).cpu()):016x}" for n, t in tensors.items()}


def env_with_repo(**extra: str) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def push(url: str, ckpt: Path, version: str, extra: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run the real loader CLI; the push seconds it reports (buckets only) and its stage times."""
    cmd = [
        sys.executable,
        "-m",
        "sglang_ckpt_plugin.update",
        "--checkpoint-path",
        str(ckpt),
        "--endpoint",
        url,
        "--weight-version",
        version,
        "--quiet",
        "--timeout",
        "300",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or env_with_repo(), timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"loader failed ({version}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    stages = re.search(r"stages: (.*)", proc.stdout)
    return float(re.search(r"GB in ([\d.]+) s", proc.stdout).group(1)), stages.group(1) if stages else ""


class Check:
    def __init__(self, url: str, device: torch.device):
        self.url, self.device, self.rows, self.ok = url, device, [], True
        self.stages: list[str] = []  # where each push's time went
        self.baseline = self.memory()

    def memory(self) -> int | None:
        return httpx.get(f"{self.url}/memory", timeout=60).json()["free_bytes"]

    def reset(self) -> None:
        """The stand-in's parameters back to its marker (not a checkpoint's bytes)."""
        httpx.post(f"{self.url}/reset", json={}, timeout=600).raise_for_status()

    def record(
        self,
        name: str,
        nbytes: int,
        seconds: float,
        expected: dict[str, str],
        baseline_rate: float,
        memory: bool = True,
    ) -> None:
        """One row. ``memory``: the pusher has let go of its buffers, so the device's free memory must be back
        where it was before the first push (a mapping the server kept would hold the loader's memory)."""
        served = httpx.get(f"{self.url}/digests", timeout=600).json()
        identical = served == expected
        self.ok &= identical
        rate = nbytes / GB / seconds
        self.rows.append(
            (
                name,
                f"{seconds:.3f} s",
                f"{rate:.2f} GB/s",
                f"{rate / baseline_rate:.2f}x",
                "yes" if identical else "NO",
                self.memory_cell() if memory else "(pusher holds buffers)",
            )
        )

    def memory_cell(self) -> str:
        free = self.memory()
        if free is None:
            return "n/a (cpu)"
        self.ok &= free >= self.baseline - MEMORY_SLACK
        return f"{(self.baseline - free) / 2**20:+.0f} MiB used"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gb", type=float, default=None, help="checkpoint size (default: 2 on cuda, 0.2 on cpu)")
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--start-delay",
        type=float,
        default=None,
        help="time to ready: the stand-in answers after this many seconds (default: 15 on cuda, 3 on cpu)",
    )
    p.add_argument(
        "--failed-updates",
        type=int,
        default=None,
        help="failed updates the leak rows make (default: 20 on cuda, 3 on cpu)",
    )
    a = p.parse_args()
    if a.failed_updates is None:
        a.failed_updates = 20 if a.device == "cuda" else 3
    if a.start_delay is None:
        a.start_delay = 15.0 if a.device == "cuda" else 3.0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; run with --device cpu for the CPU path", file=sys.stderr)
        return 2
    cuda = a.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-standalone-"))
    t0 = time.perf_counter()
    ckpt = make_checkpoint(work / "ckpt", a.gb or (2.0 if cuda else 0.2))
    tensors = file_tensors(ckpt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    expected = digests(tensors)
    print(
        f"[standalone] {nbytes / GB:.2f} GB, {len(tensors)} tensors ready in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    # baselines, same run: pinned H2D (loader's path) and D2D (LocalPush's path); host memcpy on cpu
    probe = min(nbytes, 1 << 30)
    host = torch.empty(probe, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(probe, dtype=torch.uint8, device=device)
    h2d = copy_rate(host, dev)
    d2d = copy_rate(dev, torch.empty_like(dev))
    del host, dev
    if cuda:
        torch.cuda.empty_cache()  # the memory baseline is the whole device's free memory

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench/standin_server.py"),
            "--checkpoint",
            str(ckpt),
            "--device",
            a.device,
            "--port",
            str(port),
        ],
        env=env_with_repo(),
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                info = httpx.get(f"{url}/model_info", timeout=5).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the stand-in server did not start") from None
                time.sleep(0.5)
        check = Check(url, device)
        word_sums_agree(tensors, device, check)
        variants = [
            ("loader, defaults", [], {}),
            ("loader, --verify", ["--verify"], {}),
            ("loader, 16M buckets, --num-buffers 1", ["--bucket-size", "16M", "--num-buffers", "1"], {}),
        ]
        if cuda:
            uuid = info["ckpt_plugin"]["rank_keys"][0]
            variants += [
                ("loader sees the GPU by UUID only", [], {"CUDA_VISIBLE_DEVICES": uuid}),
                ("loader, expandable_segments:True", [], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
                ("loader --device cpu (server copies H2D)", ["--device", "cpu"], {}),
                ("loader, --direct-io on (O_DIRECT into the staging)", ["--direct-io", "on"], {}),
            ]
        else:
            variants += [("loader, --transfer copy", ["--transfer", "copy"], {})]
        for name, args, env in variants:
            check.reset()  # every variant writes every parameter afresh: one that wrote nothing fails
            seconds, stages = push(url, ckpt, name.replace(" ", "_")[:40], args, env_with_repo(**env))
            check.record(name, nbytes, seconds, expected, h2d)
            check.stages.append(f"{name}: {stages}")
        row, ok = failed_updates(url, ckpt, a.failed_updates, env_with_repo())
        check.rows.append(row)
        check.ok &= ok
        local_push(url, device, tensors, check, d2d)
        row, ok = pinned_staging_row(device)
        check.rows.append(row)
        check.ok &= ok
    finally:
        server.terminate()
        server.wait(timeout=60)
    ready = [time_to_ready(ckpt, a.device, a.start_delay, options) for options in ([], ["--no-read-ahead"])]
    read_s = cold_read_s(ckpt)

    base = "pinned H2D" if cuda else "host memcpy"
    print(f"\n| baseline, same run ({a.device}) | GB/s |\n|---|---|")
    print(
        f"| {base} copy, best of 5 | {h2d:.2f} |\n| {'device-to-device' if cuda else 'host memcpy'} copy "
        f"(LocalPush's baseline), best of 5 | {d2d:.2f} |"
    )
    print(f"\n| variant ({nbytes / GB:.2f} GB) | push | rate | vs baseline | byte-identical | server memory vs start |")
    print("|---|---|---|---|---|---|")
    for row in check.rows:
        print("| " + " | ".join(row) + " |")
    print("\nwhere the time went:\n" + "\n".join(f"- {line}" for line in check.stages))
    copy_base = "device-to-device" if cuda else "host memcpy"
    print(f"\nbaselines: loader rows vs {base}; LocalPush rows vs {copy_base} copy")
    print(
        f"\n| loader started with a stand-in that answers after {a.start_delay:g} s (cold page cache) | ready s | "
        "server answered s | hand-over s | max(answered, read) + hand-over s | ready / that |\n"
        "|---|---|---|---|---|---|"
    )
    for name, row in zip(("reading ahead (default)", "--no-read-ahead"), ready):
        bound = max(row["answered"], read_s) + row["handover"]
        print(
            f"| {name} | {row['ready']:.2f} | {row['answered']:.2f} | {row['handover']:.2f} | {bound:.2f} | "
            f"{row['ready'] / bound:.2f} |"
        )
    print(
        f"cold read of the checkpoint alone (the loader's reader): {read_s:.2f} s; target (issue 18): ready / that "
        "<= 1.1 reading ahead"
    )
    print(f"VERDICT {'PASS' if check.ok else 'FAIL'}: every variant byte-identical and server memory back to its start")
    return 0 if check.ok else 1


def word_sums_agree(tensors: dict, device: torch.device, check: Check) -> None:
    """--verify's checksum for GPU buffers: the receiver's sums on the device equal the loader's on the host."""
    from sglang_ckpt_plugin.transport.word_sums import device_digest, host_digest

    sample = list(tensors.values())[:4]
    same = all(
        device_digest(t.to(device).reshape(-1).view(torch.uint8))
        == host_digest(t.reshape(-1).view(torch.uint8).numpy())
        for t in sample
    )
    check.ok &= same
    check.rows.append((f"word sums on {device.type} == on the host ({len(sample)} tensors)", "", "", "", str(same), ""))


def cold_read_s(ckpt: Path) -> float:
    """The loader's reader over every file once, from storage (the page cache dropped first)."""

    from sglang_ckpt_plugin.loader.early_read import drop_cached

    for f in ckpt.glob("*.safetensors"):
        drop_cached(str(f))
    return read_once_s(ckpt)


def time_to_ready(ckpt: Path, device: str, delay: float, options: list[str]) -> dict[str, float]:
    """A stand-in that answers after ``delay`` s and the loader, launched together, the checkpoint cold: seconds to
    the loader's exit (the weights are in), to the stand-in's first answer, and a warm push into it after."""
    from sglang_ckpt_plugin.loader.early_read import drop_cached

    for f in ckpt.glob("*.safetensors"):
        drop_cached(str(f))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench/standin_server.py"),
            "--checkpoint",
            str(ckpt),
            "--device",
            device,
            "--port",
            str(port),
            "--start-delay",
            str(delay),
        ],
        env=env_with_repo(),
    )
    cmd = [
        sys.executable,
        "-m",
        "sglang_ckpt_plugin.update",
        "--checkpoint-path",
        str(ckpt),
        "--endpoint",
        url,
        "--weight-version",
        "ready",
        "--quiet",
        "--timeout",
        "300",
        *options,
    ]
    loader = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_repo())
    try:
        answered = None
        while loader.poll() is None:
            if answered is None:
                try:
                    httpx.get(f"{url}/model_info", timeout=1)
                    answered = time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        ready = time.perf_counter() - t0
        out, err = loader.communicate()
        if loader.returncode != 0:
            raise RuntimeError(f"loader started with the stand-in failed:\n{out[-2000:]}\n{err[-2000:]}")
        t_warm = time.perf_counter()
        push(url, ckpt, "warm", options)
        return {"ready": ready, "answered": answered or ready, "handover": time.perf_counter() - t_warm}
    finally:
        server.terminate()
        server.wait(timeout=60)


def local_push(url: str, device: torch.device, tensors: dict, check: Check, d2d: float) -> None:
    """Three pushes of in-memory tensors from this process (x, 2x, 3x), the buffers kept between pushes; the
    memory check follows close()."""
    from sglang_ckpt_plugin.local_push import LocalPush

    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    server_free, pusher_held = [], []  # after each push: repeated pushes must not grow either side's memory
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with LocalPush(url, timeout_s=300) as pusher:
        for k in (1, 2, 3):
            scaled = {n: t * k for n, t in tensors.items()}  # on the CPU: the expected bytes
            on_device = {n: t.to(device) for n, t in scaled.items()}
            check.reset()
            stats = pusher.push(on_device.items(), weight_version=f"local-{k}x")
            del on_device
            name = f"LocalPush {k}x ({pusher.device.type} buffers)"
            check.record(name, nbytes, stats.seconds, digests(scaled), d2d, memory=False)
            check.stages.append(
                f"{name}: {stats.buckets} buckets | fill {stats.fill_s:.4f} s | server load "
                f"{stats.server_load_s:.4f} s | whole push {stats.seconds:.4f} s"
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
                server_free.append(check.memory())
                pusher_held.append(torch.cuda.memory_reserved(device))
        refused_ok = refused_local_push(pusher, url, tensors, device)  # then closed: every buffer given back
    row, ok = pusher_memory_row(device, allocated_before, refused_ok)
    check.rows.append(row)
    check.ok &= ok
    if device.type == "cuda":
        grown = {"server": server_free[0] - server_free[-1], "pusher": pusher_held[-1] - pusher_held[0]}
        check.ok &= max(grown.values()) <= MEMORY_SLACK
        cell = ", ".join(f"{side} {b / 2**20:+.0f} MiB" for side, b in grown.items())
        check.rows.append(("LocalPush 3x vs 1x: device memory grown", "", "", "", "", cell))
        # the per-bucket round trips that one exchange (the whole update in one bucket, the default here) saves
        with LocalPush(url, timeout_s=300, bucket_bytes=64 << 20) as pusher:
            on_device = {n: t.to(device) for n, t in tensors.items()}  # before the clock starts
            check.reset()
            stats = pusher.push(on_device.items(), weight_version="local-64m")
            del on_device
            name = "LocalPush 1x, 64 MiB buckets"
            check.record(name, nbytes, stats.seconds, digests(tensors), d2d, memory=False)
            check.stages.append(
                f"{name}: {stats.buckets} buckets | fill {stats.fill_s:.4f} s | server load "
                f"{stats.server_load_s:.4f} s | whole push {stats.seconds:.4f} s"
            )
        torch.cuda.empty_cache()
    check.rows.append(("LocalPush closed", "", "", "", "", check.memory_cell()))


if __name__ == "__main__":
    sys.exit(main())
