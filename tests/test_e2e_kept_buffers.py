"""A real SGLang server (--tp 2, on this CPU) started with --keep-update-buffers: each one-shot loader fills the
bucket buffers the server keeps (allocated while it waited for its first weights) instead of allocating and
faulting in its own, staged or streamed; one loader process feeds both TP ranks (rank 1 maps the same file)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.demo.evidence import parameter_checksums
from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids

from .conftest import NEW_TOKENS, PROMPT, assert_serves, our_leftovers, push, run_with_stacks

pytestmark = pytest.mark.slow

KEPT = "via shared bucket buffers (one set for 2 server ranks) kept by the server between updates, lent to this one"
ALLOCATED = re.compile(r"kept update buffers: ([\d.]+) MB")


@pytest.fixture(scope="module")
def kept_server(llama_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "kept_server.log"
    with SGLangServer(llama_a, log, tp_size=2, extra_args=["--keep-update-buffers"]) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


def copy_push(url: str, ckpt: Path, version: str, *extra: str, check: bool = True):
    return push(
        url,
        ckpt,
        "--inference-parallel-size",
        "2",
        "--transfer",
        "copy",
        "--weight-version",
        version,
        *extra,
        check=check,
    )


def allocations(log: Path) -> list[float]:
    """MB of every allocation (or growth) of the kept buffers the server logged."""
    return [float(gb) for gb in ALLOCATED.findall(log.read_text(errors="replace"))]


def test_the_first_push_fills_buffers_the_server_allocated_while_it_waited(kept_server, llama_a):
    log = kept_server.log_path
    deadline = time.monotonic() + 120
    while not allocations(log) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert allocations(log), "the waiting server allocated no update buffers"
    assert httpx.get(f"{kept_server.url}/health").status_code == 503
    info = httpx.get(f"{kept_server.url}/model_info").json()["ckpt_plugin"]
    assert info["keeps_update_buffers"] is True
    before = set(our_leftovers())
    out = copy_push(kept_server.url, llama_a, "a-first")
    assert KEPT in out.stdout, out.stdout
    assert set(our_leftovers()) - before == set()
    kept_server.wait_healthy(timeout_s=60)  # the gate opened: SGLang's own health check passes
    assert generate_ids(kept_server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-first"
    assert_serves(kept_server.url, llama_a)


@pytest.mark.parametrize("phases", ["staged", "streamed"])
def test_every_update_reuses_them_and_serves_exactly_the_checkpoint(kept_server, llama_a, llama_b, phases):
    extra = ["--two-phase", "off"] if phases == "streamed" else []
    copy_push(kept_server.url, llama_a, "a")  # the server serves A: B must really arrive
    allocated = allocations(kept_server.log_path)
    out = copy_push(kept_server.url, llama_b, f"b-{phases}", *extra)
    assert KEPT in out.stdout, out.stdout
    assert allocations(kept_server.log_path) == allocated, "the server allocated its buffers again"
    assert generate_ids(kept_server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == f"b-{phases}"
    assert_serves(kept_server.url, llama_b)


def test_a_refused_push_changes_nothing_and_the_next_one_borrows_again(kept_server, llama_a, llama_b, tmp_path):
    copy_push(kept_server.url, llama_a, "a-before")
    served = parameter_checksums(kept_server.url)
    bad = tmp_path / "missing_norm"
    shutil.copytree(llama_b, bad, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {k: v for f in llama_b.glob("*.safetensors") for k, v in load_file(f).items()}
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, bad / "model.safetensors")
    before = set(our_leftovers())
    proc = copy_push(kept_server.url, bad, "bad", check=False)
    assert proc.returncode == 1 and "does not cover 1 parameter" in proc.stderr, proc.stderr
    assert parameter_checksums(kept_server.url) == served
    assert set(our_leftovers()) - before == set()
    out = copy_push(kept_server.url, llama_b, "b-after")  # the refused update gave the buffers back
    assert KEPT in out.stdout, out.stdout
    assert_serves(kept_server.url, llama_b)


def test_a_loader_may_still_allocate_its_own(kept_server, llama_a):
    out = copy_push(kept_server.url, llama_a, "a-own", "--use-kept-buffers", "off")
    assert "shared bucket buffers (one set for 2 server ranks) allocated by the loader" in out.stdout, out.stdout
    assert_serves(kept_server.url, llama_a)


def test_torchrun_ranks_on_one_node_fill_them_too(kept_server, llama_a, llama_b):
    """``torchrun --nproc-per-node 2``: loader rank 0 feeds both TP ranks (the one-copy path) from the buffers the
    server keeps, with the other rank in the group."""
    from sglang_ckpt_plugin.demo.launch import free_port
    from sglang_ckpt_plugin.loader.cli import torchrun_command

    copy_push(kept_server.url, llama_a, "a")
    args = ["--checkpoint-path", str(llama_b), "--endpoint", kept_server.url, "--inference-parallel-size", "2"]
    args += ["--quiet", "--timeout", "120", "--weight-version", "b-torchrun", "--transfer", "copy"]
    out = run_with_stacks(torchrun_command(args, port=free_port(), nproc_per_node=2), 300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sglang-ckpt rank 0] pushed" in out.stdout and KEPT in out.stdout, out.stdout
    assert_serves(kept_server.url, llama_b)
