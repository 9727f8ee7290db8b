"""The loader's read stage alone: a checkpoint in the page cache read by ``CheckpointReader`` into bucket-sized
destination memory, for several thread counts, against copies measured in the same run.

CPU (``make bench``): into a pre-faulted buffer (a bucket buffer that exists already), against a one-thread memcpy
of the same bytes (issue 18's CPU target: >= 1.5x it with two threads). CUDA (the device check): into pinned memory
(``cudaHostAlloc``) and into page-aligned memory registered with ``cudaHostRegister``, against pinned host-to-device.
Each destination is 64 MiB (the staging chunk), reused: what stays constant is the destination, what varies is the
number of threads copying out of the page cache.

    python bench/read_bench.py [--gb 1.0] [--threads 1,2,4,8,16,32] [--device cpu|cuda] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import mmap
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from targets import Target, print_verdicts  # noqa: E402

from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint  # noqa: E402
from sglang_ckpt_plugin.loader.early_read import file_spans  # noqa: E402
from sglang_ckpt_plugin.loader.reader import CheckpointReader  # noqa: E402

GB = 1e9
CHUNK = 64 << 20


def copy_rate(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    """Best-of GB/s of ``dst.copy_(src)`` (pinned host -> device, device -> device, or host memcpy)."""
    cuda = src.is_cuda or dst.is_cuda
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return src.numel() / GB / best


def random_files(work: Path, gb: float) -> Path:
    """Plain safetensors files of random bytes (no model needed to read them)."""
    from safetensors.torch import save_file

    out = work / f"read-{gb:g}gb"
    if not list(out.glob("*.safetensors")):
        out.mkdir(parents=True, exist_ok=True)
        per_file = int(min(gb, 0.5) * GB)
        for i in range(max(1, round(gb * GB / per_file))):
            tensors = {f"t{i}.{k}": torch.randint(0, 255, (per_file // 8,), dtype=torch.uint8) for k in range(8)}
            save_file(tensors, out / f"part-{i:03d}.safetensors")
    return out


def read_all(reader: CheckpointReader, spans, dest: memoryview) -> float:
    t0 = time.perf_counter()
    for path, offset, length in spans:
        for at in range(offset, offset + length, CHUNK):
            reader.read_range(path, at, dest[: min(CHUNK, offset + length - at)])
    return time.perf_counter() - t0


def read_once_s(ckpt: Path) -> float:
    """Seconds for the loader's reader to read every tensor byte of ``ckpt`` once (cold if the caller dropped the
    page cache first)."""
    reader = CheckpointReader()
    seconds = read_all(reader, file_spans(read_checkpoint(ckpt)), memoryview(bytearray(CHUNK)))
    reader.close()
    return seconds


def memcpy_s(nbytes: int, threads: int = 1) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    src, dst = torch.ones(CHUNK, dtype=torch.uint8), torch.zeros(CHUNK, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(max(1, nbytes // CHUNK)):
            dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return best


def destinations(device: str) -> dict[str, tuple[memoryview, object]]:
    """Name -> (the memory the reader writes, what keeps it alive)."""
    if device == "cpu":
        host = torch.zeros(CHUNK, dtype=torch.uint8)  # pre-faulted
        return {"pre-faulted host buffer": (memoryview(host.numpy()), host)}
    pinned = torch.zeros(CHUNK, dtype=torch.uint8, pin_memory=True)
    region = mmap.mmap(-1, CHUNK)  # page-aligned anonymous memory, then registered with the driver
    registered = torch.frombuffer(region, dtype=torch.uint8)
    registered.zero_()
    if int(torch.cuda.cudart().cudaHostRegister(registered.data_ptr(), CHUNK, 0)) != 0:  # cudaSuccess is 0
        raise RuntimeError("cudaHostRegister of page-aligned memory failed")
    return {
        "pinned (cudaHostAlloc)": (memoryview(pinned.numpy()), pinned),
        "registered (mmap + cudaHostRegister)": (memoryview(registered.numpy()), (registered, region)),
    }


def h2d_rate(nbytes: int) -> float:
    host = torch.empty(min(nbytes, 1 << 30), dtype=torch.uint8, pin_memory=True)
    return copy_rate(host, torch.empty_like(host, device="cuda"))


def registered_mapping_rate(spans, baseline: float) -> str:
    """Host -> device straight from the checkpoint's own file mapping, registered read-only with the driver
    (``cudaHostRegisterReadOnly``, where the device supports it): no read into staging at all."""
    import os

    flags = 1 | 8  # cudaHostRegisterPortable | cudaHostRegisterReadOnly
    rt = torch.cuda.cudart()
    path, offset, length = max(spans, key=lambda s: s[2])
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        host = torch.frombuffer(memoryview(mapping), dtype=torch.uint8)  # read-only: torch warns, nothing writes
        start = offset - offset % mmap.PAGESIZE
        region = host[start : offset + length]
        if int(rt.cudaHostRegister(region.data_ptr(), region.numel(), flags)) != 0:  # cudaSuccess is 0
            return "not supported here (cudaHostRegister with cudaHostRegisterReadOnly failed)"
        rate = copy_rate(region, torch.empty(region.numel(), dtype=torch.uint8, device="cuda"), repeats=3)
        rt.cudaHostUnregister(region.data_ptr())
        return f"{rate:.2f} GB/s ({rate / baseline:.2f}x pinned H2D), {region.numel() / GB:.2f} GB, best of 4"
    except (RuntimeError, OSError, ValueError) as exc:
        return f"failed: {exc}"
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--threads", default="1,2,4,8,16,32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-read-bench-"))
    spans = file_spans(read_checkpoint(random_files(work, a.gb)))
    nbytes = sum(n for _, _, n in spans)
    threads = [int(t) for t in a.threads.split(",") if t.strip()]
    dests = destinations(a.device)
    read_all(CheckpointReader(threads=max(threads)), spans, next(iter(dests.values()))[0])  # warm the page cache
    baseline_name, baseline = (
        ("pinned host-to-device", h2d_rate(nbytes))
        if a.device == "cuda"
        else ("one-thread memcpy", nbytes / GB / memcpy_s(nbytes))
    )
    print(
        f"\n{nbytes / GB:.2f} GB in the page cache, read in 64 MiB chunks, best of 3; baseline ({baseline_name}, "
        f"same run): {baseline:.2f} GB/s\n"
    )
    print(f"| destination | threads | GB/s | vs {baseline_name} |\n|---|---|---|---|")
    targets = []
    for name, (dest, _keep) in dests.items():
        for n in threads:
            reader = CheckpointReader(threads=n)
            seconds = min(read_all(reader, spans, dest) for _ in range(3))
            reader.close()
            rate = nbytes / GB / seconds
            print(f"| {name} | {n} | {rate:.2f} | {rate / baseline:.2f} |")
            if a.device == "cpu" and n == 2:
                targets.append(Target(f"{name}, two threads / {baseline_name}", rate / baseline, 1.5, False, "x"))
    if a.device == "cpu":
        print_verdicts("issue 18, CPU", targets)
    else:
        print(f"\nH2D from the checkpoint's registered file mapping: {registered_mapping_rate(spans, baseline)}")
        print("target (issue 18, H200): the push >= 0.85x pinned H2D; the read stage must reach it first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
