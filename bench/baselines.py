"""Reference figures measured in the same run as our push: memcpy, SGLang's own update paths, memory."""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

GB = 1e9
# every bench server (ours and the baseline's): an idle scheduler otherwise spins one of the two cores
SERVER_ARGS = ["--sleep-on-idle"]


def bench_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options every bench shares: checkpoint size, rounds, and a work directory that keeps checkpoints."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="size of the generated bf16 checkpoint")
    p.add_argument("--repeats", type=int, default=repeats, help="rounds; every figure is a median over them")
    p.add_argument("--workdir", default=None, help="keep (and reuse) the generated checkpoints here")
    return p


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


def _post(url: str, path: str, body: dict) -> dict:
    resp = httpx.post(f"{url}{path}", json=body, timeout=900)
    data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code != 200 or not data.get("success", True):
        raise RuntimeError(f"{path} failed: {resp.text[:300]}")
    return data


def time_disk_update(url: str, ckpt: Path, version: str) -> float:
    t0 = time.perf_counter()
    _post(url, "/update_weights_from_disk", {"model_path": str(ckpt), "load_format": "auto", "weight_version": version})
    return time.perf_counter() - t0


def time_update_from_tensor(
    url: str, tensors: dict[str, torch.Tensor], version: str, tp: int = 1, flush_cache: bool = True
) -> float:
    """SGLang's RL path as a trainer uses it over HTTP: fresh tensors (not yet in shared memory), serialized
    with SGLang's MultiprocessingSerializer inside a begin/end weight-update session; one payload per TP rank
    (SGLang indexes the list by rank: a shorter list kills its scheduler). ``flush_cache=False`` while clients
    send requests (SGLang answers failure when it cannot flush a busy cache, though the weights were updated)."""
    from sglang.srt.utils import MultiprocessingSerializer

    # The server is not our child, so fd passing (torch's default) cannot authenticate; shared-memory files can.
    torch.multiprocessing.set_sharing_strategy("file_system")
    fresh = [(name, t.clone()) for name, t in tensors.items()]  # private memory, as a trainer holds them
    t0 = time.perf_counter()
    payload = base64.b64encode(MultiprocessingSerializer.serialize(fresh)).decode()
    _post(url, "/begin_weight_update", {})
    body = {"serialized_named_tensors": [payload] * tp, "weight_version": version, "flush_cache": flush_cache}
    _post(url, "/update_weights_from_tensor", body)
    _post(url, "/end_weight_update", {})
    return time.perf_counter() - t0


def run_loader(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """(result, seconds, peak RSS in bytes of the largest process it started), via a wrapper that waits for
    it, so that the figure is the loader's own (RUSAGE_CHILDREN of the wrapper)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=900, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"loader failed: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"MAXRSS_KB (\d+)", proc.stderr).group(1)) * 1024
    return proc, seconds, rss


def import_baseline_rss() -> int:
    """Peak RSS of a process that only imports what the loader imports (Python + torch + our loader)."""
    _, _, rss = run_loader([sys.executable, "-c", "import torch, sglang_ckpt_plugin.loader.run"])
    return rss


def scheduler_pid(server_pid: int) -> int | None:
    """The (first) scheduler process of a server."""
    from sglang_ckpt_plugin.demo.processes import scheduler_pids

    found = scheduler_pids(server_pid)
    return found[0] if found else None


def _rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssShmem", "RssFile")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields


class RssSampler:
    """Peak growth of a process's resident memory while a block runs (sampled every 5 ms)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak: dict[str, int] = {}
        self.before: dict[str, int] = {}
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self.before = _rss(self.pid)
            self.peak = dict(self.before)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = _rss(self.pid)
            except OSError:
                return
            for k, v in now.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.pid is not None:
            self._thread.join()

    def growth(self, key: str) -> int:
        return self.peak.get(key, 0) - self.before.get(key, 0)


def time_to_ready_auto(ckpt: Path, log: Path) -> float:
    """A plain ``--load-format auto`` start, to /health 200."""
    from sglang_ckpt_plugin.demo.launch import SGLangServer

    t0 = time.perf_counter()
    with SGLangServer(ckpt, log, wait_for_weights=False, extra_args=SERVER_ARGS) as srv:
        srv.wait_healthy(timeout_s=900)
        return time.perf_counter() - t0


def startup_load_weight_s(log: Path) -> float | None:
    """SGLang's own ``load_weight`` figure from a server log (the dummy fill, or the real read)."""
    found = re.findall(r"load_weight=([\d.]+)", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


class PauseProbe:
    """What a client sees during an update: a short greedy ``/generate`` (1 token) fired every ``every_s``
    seconds, whether or not the previous one has answered; the pause is the longest latency of a request sent
    while the update ran (SGLang's model-update lock holds requests for as long as it is held)."""

    def __init__(self, url: str, every_s: float = 0.05):
        import concurrent.futures
        import threading

        self.url, self.every_s = url, every_s
        self.samples: list[tuple[float, float]] = []  # (sent at, latency), perf_counter seconds
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(64)
        self._thread = threading.Thread(target=self._fire, daemon=True)

    def _one(self) -> None:
        import httpx

        body = {"input_ids": list(range(10, 20)), "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        sent = time.perf_counter()
        try:
            httpx.post(f"{self.url}/generate", json=body, timeout=120).raise_for_status()
            self.samples.append((sent, time.perf_counter() - sent))
        except Exception:  # noqa: BLE001 - an error is a pause too
            self.samples.append((sent, float("inf")))

    def _fire(self) -> None:
        while not self._stop.is_set():
            self._pool.submit(self._one)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PauseProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def pause(self, start: float, end: float) -> float:
        """The longest latency among requests sent in [start, end]."""
        return max((lat for sent, lat in self.samples if start <= sent <= end), default=0.0)

    def idle(self, before: float) -> float:
        """Median latency of the requests sent before ``before`` (no update running)."""
        lats = sorted(lat for sent, lat in self.samples if sent < before)
        return lats[len(lats) // 2] if lats else 0.0


@contextlib.contextmanager
def serving_servers(ckpt: Path, logs: list[Path], extra_args: list[str] = (), **kwargs):
    """One server per log, started together (``--sleep-on-idle``, and ``extra_args``), each given the real weights by
    SGLang's own disk reload and healthy; all stopped on exit."""
    from sglang_ckpt_plugin.demo.launch import SGLangServer

    servers = [SGLangServer(ckpt, log, extra_args=[*SERVER_ARGS, *extra_args], **kwargs) for log in logs]
    with contextlib.ExitStack() as stack:
        for srv in servers:
            stack.enter_context(srv)
        for srv in servers:
            srv.wait_listening(timeout_s=900)
            time_disk_update(srv.url, ckpt, "initial")
            srv.wait_healthy(timeout_s=300)
        yield servers


def measure_pause(url: str, update, every_s: float = 0.05) -> tuple[float, float, float]:
    """(idle median latency, pause during ``update()``, the update's own seconds), same server, same probe (a
    request every ``every_s``: keep it above a request's own latency, or the probe queues and measures itself)."""
    idles, pauses, seconds = measure_pauses([url], update, every_s)
    return idles[0], pauses[0], seconds


def measure_pauses(urls: list[str], update, every_s: float = 0.05) -> tuple[list[float], list[float], float]:
    """``measure_pause`` on several servers at once (a fleet update): one probe each, the same window."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(PauseProbe(url, every_s)) for url in urls]
        time.sleep(1.0)
        start = time.perf_counter()
        update()
        end = time.perf_counter()
        time.sleep(0.5)
    return [p.idle(start) for p in probes], [p.pause(start, end) for p in probes], end - start
