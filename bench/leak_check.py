"""The device check's rows for what failed updates leave behind (issue 28), run by bench/standalone_check.py against
the stand-in server: on a GPU only the device's own counters show a mapping never closed, an IPC reference never
given back, a block never returned, or pinned memory rounded up.

- failed updates: N loader runs that fail (the stand-in's ``load_weights`` raises; the loader announces wrong
  checksums under ``--verify``; the stand-in refuses the hello), each with its reason; then the server's device
  memory must be back where it was and no loader mapping parked by the receiver (``/memory``: ``kept_alive``);
- a refused LocalPush: the push raises with the server's reason, and once the pusher is closed the pusher's own
  allocated device memory is back where it was before it was made (a buffer whose handle the server never opened
  stays allocated while its IPC reference is not given back);
- pinned staging: what torch's host allocator pins for the loader's staging chunks against what the loader counts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
MEMORY_SLACK = 64 << 20  # as in standalone_check: the caching allocator's rounding; a bucket buffer is far larger
FAILURES = ("load", "verify", "validate")  # cycled through
REASONS = {
    "load": "the stand-in's load_weights fails",
    "verify": "checksum mismatch",
    "validate": "refused by the stand-in",
}


def server_memory(url: str) -> dict:
    return httpx.get(f"{url}/memory", timeout=60).json()


def fail_next(url: str, at: str | None) -> None:
    """Updates fail ``at`` the dry run ("validate") or the load ("load") until this is called with None."""
    httpx.post(f"{url}/fail_next", json={"at": at}, timeout=60).raise_for_status()


def failing_update(url: str, ckpt: Path, at: str, env: dict) -> subprocess.CompletedProcess:
    """One loader run that must fail ``at`` the given place."""
    args = ["--checkpoint-path", str(ckpt), "--endpoint", url, "--quiet", "--timeout", "300"]
    args += ["--weight-version", f"failing-{at}"]
    if at == "verify":  # the real CLI with wrong digests announced (the test suite's fault injector)
        cmd = [sys.executable, str(ROOT / "tests/faulty_loader.py"), "corrupt-digests", "--", *args, "--verify"]
    else:
        fail_next(url, at)
        cmd = [sys.executable, "-m", "sglang_ckpt_plugin.update", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    finally:
        fail_next(url, None)


def failed_updates(url: str, ckpt: Path, count: int, env: dict) -> tuple[tuple[str, ...], bool]:
    """``count`` failed updates; the row and whether each failed with its reason and nothing was left."""
    before = server_memory(url)
    explained = True
    for i in range(count):
        at = FAILURES[i % len(FAILURES)]
        proc = failing_update(url, ckpt, at, env)
        said = proc.stdout + proc.stderr
        if proc.returncode == 0 or REASONS[at] not in said:
            explained = False
            print(f"[leak-check] failed update {i} ({at}) did not fail with its reason:\n{said[-2000:]}", flush=True)
    after = server_memory(url)
    parked = after["kept_alive"] - before["kept_alive"]
    if after["free_bytes"] is None:
        memory_ok, used = True, "n/a (cpu)"
    else:
        memory_ok = after["free_bytes"] >= before["free_bytes"] - MEMORY_SLACK
        used = f"{(before['free_bytes'] - after['free_bytes']) / 2**20:+.0f} MiB used"
    row = (
        f"{count} failed updates (load_weights raises, checksum mismatch, refused hello)",
        "",
        "",
        "",
        "each failed, with its reason" if explained else "NO: see above",
        f"{used}, {parked} loader mappings parked",
    )
    return row, explained and memory_ok and parked == 0


def refused_local_push(pusher, url: str, tensors: dict, device: torch.device) -> bool:
    """A LocalPush the server refuses at the hello: it must raise with the server's reason."""
    fail_next(url, "validate")
    on_device = {n: t.to(device) for n, t in tensors.items()}
    try:
        pusher.push(on_device.items(), weight_version="local-refused")
    except Exception as exc:  # noqa: BLE001 - whichever error the pusher raises, it must carry the reason
        return REASONS["validate"] in str(exc)
    finally:
        fail_next(url, None)
    return False


def pusher_memory_row(device: torch.device, allocated_before: int | None, refused_ok: bool) -> tuple:
    """After the pusher was closed: its process's allocated device memory against before it was made."""
    if device.type != "cuda":
        return ("LocalPush refused, then closed: pusher memory", "", "", "", _yes(refused_ok), "n/a (cpu)"), refused_ok
    torch.cuda.synchronize(device)
    grown = torch.cuda.memory_allocated(device) - allocated_before
    reserved = torch.cuda.memory_reserved(device)
    cell = f"allocated {grown / 2**20:+.0f} MiB vs before, reserved {reserved / 2**20:.0f} MiB"
    ok = refused_ok and grown <= MEMORY_SLACK
    return ("LocalPush refused, then closed: pusher memory", "", "", "", _yes(refused_ok), cell), ok


def pinned_staging_row(device: torch.device, chunks: int = 3) -> tuple[tuple, bool]:
    """The loader's staging chunks as its filler makes them: pinned bytes held against the bytes it counts."""
    from sglang_ckpt_plugin.loader import filler

    name = f"pinned staging, {chunks} chunks as the loader makes them: held vs counted"
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return (name, "", "", "", "", "n/a (cpu)"), True
    chunk = filler.staging_chunk_bytes(filler.STAGING_CHUNK_BYTES, pinned=True)
    counted, before = chunks * chunk, _pinned_bytes()
    if before is None:
        return (name, "", "", "", "", f"counted {counted / 2**20:.0f} MiB; torch reports no host stats"), True
    made = [filler._staging_chunk(chunk, pinned=True) for _ in range(chunks)]
    held = _pinned_bytes() - before
    del made
    cell = f"held {held / 2**20:.0f} MiB, counted {counted / 2**20:.0f} MiB"
    return (name, "", "", "", "", cell), held <= counted + MEMORY_SLACK


def _pinned_bytes() -> int | None:
    """Bytes torch's host allocator holds pinned now (reserved: what it asked the driver for)."""
    stats = torch.cuda.host_memory_stats()
    for key in ("reserved_bytes.current", "segment_bytes.current", "allocated_bytes.current"):
        if key in stats:
            return int(stats[key])
    return None


def _yes(ok: bool) -> str:
    return "refused with its reason" if ok else "NO: not refused in words"
