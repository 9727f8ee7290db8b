"""The CUDA-path check in one command (``scripts/device_check.sh``), also runnable on the CPU path.

Builds two random bf16 Llamas (A, B) of ``--gb`` GB (1 on cuda), starts a real SGLang server on ``--device`` with
the plugin (dummy weights, waiting), pushes A, then B over it, with the loader (CUDA IPC buffers on cuda, shared
memory on cpu), and checks after each push SGLang's ``/weights_checker`` checksums and greedy output against SGLang's
own ``/update_weights_from_disk`` of the same files (must be equal; A's and B's must differ); reports HF's
teacher-forced ranks, and prints host-to-device GB/s, push seconds and disk-reload seconds for the same model. Exit
0 only if the pushed weights are bit-identical to the disk reload's, both times. ``--fp8``: the block-FP8 row alone
(``fp8_row``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import GB, time_disk_update  # noqa: E402
from push_bench import checkpoint_bytes, checkpoint_pair, time_push, warm_page_cache  # noqa: E402

from sglang_ckpt_plugin.demo.evidence import checksum, hf_ranks  # noqa: E402
from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids  # noqa: E402


def h2d_gbps(nbytes: int, device: torch.device, repeats: int = 5) -> float | None:
    """Pinned host -> device copy rate (None on cpu)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / GB / best


def fp8_row(device: str, work: Path, tokens: int, extra: list[str]) -> bool:
    """Block FP8 (DeepSeek-V3/R1's format), tiny Qwen3-MoE checkpoints A and B: a server on dummy weights takes a
    push of A, of B, then SGLang's own disk reload of A; each must serve what a fresh server started on those files
    serves (SGLang's first load, without the plugin's hooks: checksums and greedy output)."""
    from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE
    from sglang_ckpt_plugin.demo.tiny_quantized import make_tiny_fp8_model

    ckpts = {t: make_tiny_fp8_model(work / f"fp8_{t}", "qwen3_moe", seed=50 + i) for i, t in enumerate("ab")}
    prompt = list(range(10, 20))

    def served(url: str) -> tuple[str, list[int]]:
        return checksum(url), generate_ids(url, prompt, tokens)["output_ids"]

    fresh = {}
    for tag, ckpt in ckpts.items():
        env = {"SGLANG_PLUGINS": PLUGIN_FREE}
        with SGLangServer(
            ckpt, work / f"fp8_fresh_{tag}.log", device=device, wait_for_weights=False, extra_args=extra, env=env
        ) as plain:
            plain.wait_healthy(timeout_s=900)
            fresh[tag] = served(plain.url)
    loader = ["--device", device, "--timeout", "600"]
    rows = []
    with SGLangServer(ckpts["a"], work / "fp8_server.log", device=device, extra_args=extra) as srv:
        srv.wait_listening(timeout_s=900)
        for what, tag in (("push of A", "a"), ("push of B", "b"), ("SGLang's own reload of A", "a")):
            if what.startswith("push"):
                time_push(srv.url, ckpts[tag], f"fp8-{tag}", loader)
            else:
                time_disk_update(srv.url, ckpts[tag], "fp8-disk-a")
            srv.wait_healthy(timeout_s=600)
            rows.append((what, served(srv.url) == fresh[tag]))
    print(f"\n| block FP8 (tiny Qwen3-MoE, {device}): serves what a fresh server serves | value |\n|---|---|")
    for what, ok in rows:
        print(f"| {what} | {ok} |")
    print(f"| A and B serve differently | {fresh['a'] != fresh['b']} |")
    return all(ok for _, ok in rows) and fresh["a"] != fresh["b"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--fp8", action="store_true", help="only the block-FP8 row (fp8_row)")
    p.add_argument("--gb", type=float, default=None, help="checkpoint size (default: 1 on cuda, 0.4 on cpu)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--tokens", type=int, default=8)
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; run with --device cpu for the CPU path", file=sys.stderr)
        return 2
    gb = a.gb or (1.0 if a.device == "cuda" else 0.4)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-device-check-"))
    if a.fp8:
        extra = ["--mem-fraction-static", "0.3"] if a.device == "cuda" else ["--sleep-on-idle"]
        return 0 if fp8_row(a.device, work, a.tokens, extra) else 1
    t0 = time.perf_counter()
    pair = checkpoint_pair(work, gb)  # A, then B: the second push must change what is served
    ckpt_a, ckpt_b = pair.path(0), pair.path(1)
    nbytes = checkpoint_bytes(ckpt_a)
    print(
        f"[device-check] 2 x {nbytes / GB:.2f} GB bf16 checkpoints ready in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    h2d = h2d_gbps(min(nbytes, 1 << 30), device)
    prompt = list(range(10, 20))
    loader = ["--device", a.device, "--timeout", "600"]
    # on a GPU: a small static pool, so the loader's buckets and the server fit on one card beside other work
    extra = ["--mem-fraction-static", "0.3"] if a.device == "cuda" else []
    served, from_disk = {}, {}  # checkpoint -> (checksum, greedy output): after our push, after SGLang's reload
    with SGLangServer(ckpt_a, work / "server.log", device=a.device, extra_args=extra) as srv:
        srv.wait_listening(timeout_s=900)
        warm_page_cache(ckpt_a)
        first = time_push(srv.url, ckpt_a, "push-1", loader)
        srv.wait_healthy(timeout_s=600)
        served[ckpt_a] = (checksum(srv.url), generate_ids(srv.url, prompt, a.tokens)["output_ids"])
        warm_page_cache(ckpt_b)
        second = time_push(srv.url, ckpt_b, "push-2", loader)
        served[ckpt_b] = (checksum(srv.url), generate_ids(srv.url, prompt, a.tokens)["output_ids"])
        warm_page_cache(ckpt_a)
        disk_s = time_disk_update(srv.url, ckpt_a, "disk-a")
        from_disk[ckpt_a] = (checksum(srv.url), generate_ids(srv.url, prompt, a.tokens)["output_ids"])
        time_disk_update(srv.url, ckpt_b, "disk-b")
        from_disk[ckpt_b] = (checksum(srv.url), generate_ids(srv.url, prompt, a.tokens)["output_ids"])
    same_sums = all(served[c][0] == from_disk[c][0] for c in served)
    same_output = all(served[c][1] == from_disk[c][1] for c in served)
    changed = served[ckpt_a][0] != served[ckpt_b][0]
    ranks = hf_ranks(ckpt_b, prompt, served[ckpt_b][1])
    rate = lambda s: f"{nbytes / GB / s:.2f} GB/s"  # noqa: E731
    print(f"\n| figure ({a.device}, {nbytes / GB:.2f} GB) | value |\n|---|---|")
    print(f"| host-to-device copy, pinned, best of 5 | {f'{h2d:.2f} GB/s' if h2d else 'n/a (cpu)'} |")
    print(f"| push of A into dummy weights (buckets only) | {first['push_s']:.3f} s ({rate(first['push_s'])}) |")
    print(f"| second push: B over A (buckets only) | {second['push_s']:.3f} s ({rate(second['push_s'])}) |")
    print(f"| second push, whole loader process | {second['process_s']:.3f} s |")
    print(f"| SGLang /update_weights_from_disk | {disk_s:.3f} s ({rate(disk_s)}) |")
    print(
        f"| stages of the second push | read {second['read_s']:.3f} s, server load {second['load_s']:.3f} s, "
        f"waiting {second['wait_s']:.3f} s, {second['buckets']} buckets |"
    )
    print(f"| the second push changed what is served (checksum of A != of B) | {changed} |")
    print(f"| /weights_checker checksum: push == disk reload | {same_sums} |")
    print(f"| greedy output: push == disk reload | {same_output} |")
    print(f"| HF teacher-forced rank of each token after pushing B (second opinion, < 5 agrees) | {ranks} |")
    return 0 if same_sums and same_output and changed else 1


if __name__ == "__main__":
    sys.exit(main())
