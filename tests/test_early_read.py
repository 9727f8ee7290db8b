"""Reading ahead while the server starts (loader/early_read.py): the page-cache check, the reader, the share."""

import os

import pytest

from sglang_ckpt_plugin.loader.checkpoint import TensorInfo
from sglang_ckpt_plugin.loader.early_read import (
    WINDOW_BYTES,
    EarlyRead,
    cached_bytes,
    drop_cached,
    file_spans,
    likely_share,
)
from sglang_ckpt_plugin.loader.world import LoaderWorld

MiB = 1 << 20


def cold_file(path, nbytes: int) -> int:
    """A file of ``nbytes`` written and dropped from the page cache; its open descriptor."""
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
    if drop_cached(str(path)):
        pytest.skip(f"this filesystem keeps {path} cached after POSIX_FADV_DONTNEED (tmpfs?)")
    return os.open(path, os.O_RDONLY)


def test_the_read_brings_the_share_into_the_page_cache_and_skips_what_is_cached(tmp_path):
    path, span = tmp_path / "weights.bin", 90 * MiB
    fd = cold_file(path, 100 * MiB)
    try:
        first = run_to_end(EarlyRead([(str(path), 4096 + 10, span)], budget_bytes=1 << 40))
        assert first.error == "" and first.share_bytes == span
        assert first.read_bytes + first.cached_bytes == span and first.read_bytes > span // 2
        assert cached_bytes(fd, 4096 + 10, span) == span
        again = run_to_end(EarlyRead([(str(path), 4096 + 10, span)], budget_bytes=1 << 40))
        assert (again.read_bytes, again.cached_bytes) == (0, span)
        assert "read 0.000 GB of its 0.094 GB share" in again.line("[t]")
    finally:
        os.close(fd)


def test_stop_ends_the_reading_thread_after_its_window(tmp_path, monkeypatch):
    """stop() while the first of four windows is being read: that window completes, no other is read."""
    import threading
    import time

    from sglang_ckpt_plugin.loader import early_read

    path = tmp_path / "weights.bin"
    os.close(cold_file(path, 4 * WINDOW_BYTES))
    reading, may_finish, windows = threading.Event(), threading.Event(), []
    real = early_read.CheckpointReader.read_range

    def held_read(reader, file, offset, dest):
        windows.append(offset)
        reading.set()
        may_finish.wait(10)
        real(reader, file, offset, dest)

    monkeypatch.setattr(early_read.CheckpointReader, "read_range", held_read)
    early = EarlyRead([(str(path), 0, 4 * WINDOW_BYTES)], budget_bytes=1 << 40).start()
    assert reading.wait(10)
    stopper = threading.Thread(target=early.stop)
    stopper.start()
    while not early._stop.is_set():
        time.sleep(0.001)
    may_finish.set()
    stopper.join(10)
    assert not stopper.is_alive() and not early._thread.is_alive()
    assert windows == [0] and early.result.read_bytes + early.result.cached_bytes == WINDOW_BYTES


def run_to_end(early: EarlyRead):
    """Run the reading thread's body to its end in this thread (no stop in between)."""
    early._t0 = 0.0
    early._run()
    return early.result


def test_the_read_stops_at_its_memory_budget(tmp_path):
    path = tmp_path / "big.bin"
    fd = cold_file(path, 3 * WINDOW_BYTES)
    try:
        result = run_to_end(EarlyRead([(str(path), 0, 3 * WINDOW_BYTES)], budget_bytes=WINDOW_BYTES + 1))
        assert result.read_bytes == WINDOW_BYTES
        assert cached_bytes(fd, 2 * WINDOW_BYTES, WINDOW_BYTES) < WINDOW_BYTES
    finally:
        os.close(fd)


def test_a_file_that_cannot_be_read_ends_the_read_with_the_reason():
    result = run_to_end(EarlyRead([("/nonexistent/file.safetensors", 0, 10)], budget_bytes=1 << 30))
    assert "No such file" in result.error and "the push reads the files itself" in result.line("[t]")


def test_stop_before_start_reads_nothing(tmp_path):
    early = EarlyRead([(str(tmp_path / "absent"), 0, 10)])
    assert early.stop().read_bytes == 0
    early.start()  # after a stop: nothing starts
    assert early.stop().read_bytes == 0


def test_file_spans_merge_adjacent_tensors_per_file():
    def t(name, file, offset, n):
        return TensorInfo(name, "uint8", (n,), file, offset, n)

    spans = file_spans([t("b", "f1", 108, 50), t("a", "f1", 8, 100), t("c", "f1", 200, 8), t("d", "f2", 8, 4)])
    assert spans == [("f1", 8, 150), ("f1", 200, 8), ("f2", 8, 4)]


def args_for(device: str, transfer: str = "auto", method: str = "broadcast"):
    from sglang_ckpt_plugin.loader.cli import parse_args

    return parse_args(
        ["--checkpoint-path", "/c", "--device", device, "--transfer", transfer, "--update-method", method]
    )


def test_the_share_read_ahead_is_the_share_the_push_reads():
    tensors = [TensorInfo(f"t{i}", "uint8", (n,), "f", 8 + 1000 * i, n) for i, n in enumerate([400, 300, 200, 100])]
    one_node = [LoaderWorld(rank=r, world_size=2, local_rank=r, local_world_size=2, parallel_size=2) for r in (0, 1)]
    # CPU servers: one process per node reads everything, the other nothing
    assert [len(likely_share(args_for("cpu"), w, tensors)) for w in one_node] == [4, 0]
    # GPU servers: every rank its half by bytes, together the whole checkpoint
    halves = [likely_share(args_for("cuda"), w, tensors) for w in one_node]
    assert sorted(t.name for h in halves for t in h) == ["t0", "t1", "t2", "t3"]
    assert [sum(t.nbytes for t in h) for h in halves] == [500, 500]
    # two CPU nodes that each map the files: each node's feeder reads the whole checkpoint
    two_nodes = [LoaderWorld(rank=r, world_size=2, local_rank=0, local_world_size=1, node_rank=r) for r in (0, 1)]
    assert [len(likely_share(args_for("cpu", "map"), w, tensors)) for w in two_nodes] == [4, 4]
    assert sum(len(likely_share(args_for("cpu"), w, tensors)) for w in two_nodes) == 4


def test_under_a_read_rate_limit_a_stop_does_not_wait_for_a_whole_window(tmp_path, monkeypatch):
    """SGLANG_CKPT_READ_RATE slows the reader (a shared filesystem): windows shrink to what the rate reads in about
    0.1 s, so the push never waits seconds for the read-ahead to let go."""
    import time

    from sglang_ckpt_plugin.loader import reader as reader_module
    from sglang_ckpt_plugin.loader.early_read import window_bytes

    assert window_bytes(None) == WINDOW_BYTES and window_bytes(10e6) == 1_000_000 // 4096 * 4096
    path = tmp_path / "slow.bin"
    os.close(cold_file(path, 16 * MiB))
    monkeypatch.setenv(reader_module.READ_RATE_ENV, "10M")
    started = time.monotonic()
    early = EarlyRead([(str(path), 0, 16 * MiB)], budget_bytes=1 << 40).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    result = early.stop()
    assert time.monotonic() - t0 < 0.5
    # read at the rate (the kernel's own readahead may cache windows ahead, which are then skipped, not read)
    assert 0 < result.read_bytes <= 10e6 * (time.monotonic() - started) + window_bytes(10e6)


def test_a_node_reads_ahead_what_its_loader_ranks_will_read(tmp_path):
    """Before torchrun starts (``--nnodes``): node i reads the union of its ranks' shares, the nodes together the
    checkpoint once."""
    import torch
    from safetensors.torch import save_file

    from sglang_ckpt_plugin.loader.checkpoint import read_update
    from sglang_ckpt_plugin.loader.cli import parse_args

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({f"layer{i}.weight": torch.zeros(64 + 8 * i, 32) for i in range(12)}, str(ckpt / "model.safetensors"))
    whole = sum(t.nbytes for t in read_update(str(ckpt)))

    def node_bytes(node, nnodes, tp, device):
        argv = ["--checkpoint-path", str(ckpt), "--inference-parallel-size", str(tp), "--device", device]
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node), "--master-addr", "10.0.0.1"]
        return EarlyRead.for_node(parse_args(argv)).result.share_bytes

    for nnodes, tp, device in ((2, 1, "cpu"), (3, 2, "cpu"), (2, 2, "cuda")):
        shares = [node_bytes(i, nnodes, tp, device) for i in range(nnodes)]
        assert sum(shares) == whole and max(shares) < whole, (nnodes, tp, device, shares)
    assert node_bytes(0, 1, 2, "cpu") == whole


READ_ON = """
import os, sys, time
from sglang_ckpt_plugin.loader.early_read import EarlyRead
early = EarlyRead([(sys.argv[1], 0, int(sys.argv[2]))], budget_bytes=1 << 40)
early.stop()
print(early.read_on_in_child(), flush=True)
if sys.argv[3] == "wait":
    os.waitpid(-1, 0)
else:
    time.sleep(float(sys.argv[3]))
"""


def test_the_read_goes_on_in_a_child_that_ends_with_its_parent(tmp_path):
    """``read_on_in_child`` (torchrun replacing the loader): a child reads the share into the page cache and exits;
    one still reading when its parent ends is killed with it."""
    import subprocess
    import sys
    import time

    path, span = tmp_path / "weights.bin", 8 * MiB
    fd = cold_file(path, span)
    try:
        out = subprocess.run([sys.executable, "-c", READ_ON, str(path), str(span), "wait"], capture_output=True)
        assert out.returncode == 0, out.stderr
        assert cached_bytes(fd, 0, span) == span  # the child read it all, then its parent reaped it
    finally:
        os.close(fd)
    os.close(cold_file(path, span))
    env = {**os.environ, "SGLANG_CKPT_READ_RATE": str(MiB)}  # 8 s to read it: the parent ends first
    proc = subprocess.run([sys.executable, "-c", READ_ON, str(path), str(span), "0.5"], capture_output=True, env=env)
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the reading child outlived its parent"
