"""``make demo``: the main job on an embedded default, start to finish, on this machine.

1. make a small random Llama checkpoint locally (no hub access needed);
2. start ``python -m sglang.launch_server ... --load-format dummy --wait-for-initial-weights`` on 127.0.0.1;
3. show that generation is refused (503) while no weights are loaded;
4. run the loader (``python -m sglang_ckpt_plugin.update``), which prints per-stage timings;
5. generate, and prove what is served with SGLang itself: the parameters' checksums (SGLang's
   ``/weights_checker``) and the greedy output equal those after SGLang's own disk reload of the same files;
   HF transformers, teacher-forced on SGLang's tokens, as a second opinion (its top-k holds each token);
6. start SGLang without the plugin (``SGLANG_PLUGINS`` leaves it out) on the same files, ``--load-format auto``: the
   pushed server's checksums and greedy output must equal that reference, which no hook of ours touched;
7. stop everything it started and check that nothing of ours is left behind; one line of verdict.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from ..transport.channel import socket_dir
from ..transport.handles import SHM_DIR, SHM_PREFIX
from .evidence import HF_TOP_K, checksum, gather
from .launch import PLUGIN_FREE, SGLangServer, generate_ids
from .tiny_model import make_tiny_model

PROMPT_TEXT = "w11 w22 w33 w44 w55"


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def leftovers() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)] + [p.name for p in socket_dir().iterdir()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to put the checkpoint and logs (default: a temp dir)")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    # a socket directory of its own (the server and the loader inherit it), so the leak check sees only ours
    os.environ.setdefault("SGLANG_CKPT_SOCKET_DIR", str(work / "sockets"))
    before = set(leftovers())

    say(f"1. making a random Llama checkpoint in {work / 'ckpt'}")
    ckpt = make_tiny_model(
        work / "ckpt", "llama", seed=7, hidden=128, layers=4, vocab=2000, dtype=torch.float32, max_shard_size="1MB"
    )
    files = sorted(f.name for f in ckpt.glob("*.safetensors"))
    print(
        f"   {len(files)} safetensors shards + index, {sum(f.stat().st_size for f in ckpt.glob('*.safetensors'))} bytes"
    )

    say("2. starting SGLang with --load-format dummy --wait-for-initial-weights (CPU, 127.0.0.1)")
    server = SGLangServer(ckpt, work / "server.log")
    print("   " + " ".join(server.args[1:]))
    t0 = time.perf_counter()
    with server:
        server.wait_listening()
        print(f"   listening after {time.perf_counter() - t0:.1f} s (log: {server.log_path})")

        say("3. generation before any weights arrived")
        body = {"text": PROMPT_TEXT, "sampling_params": {"max_new_tokens": 4}}
        resp = httpx.post(f"{server.url}/generate", json=body, timeout=30)
        print(f"   POST /generate -> {resp.status_code}: {resp.json()['message']}")
        print(f"   GET /health -> {httpx.get(f'{server.url}/health', timeout=30).status_code}")
        if resp.status_code != 503:
            print("   FAIL: the gate let generation through", file=sys.stderr)
            return 1

        say("4. pushing the checkpoint with the loader")
        cmd = [
            sys.executable,
            "-m",
            "sglang_ckpt_plugin.update",
            "--checkpoint-path",
            str(ckpt),
            "--endpoint",
            server.url,
            "--weight-version",
            "demo-1",
            "--quiet",
        ]
        print("   " + " ".join(cmd[1:]))
        loader = subprocess.run(cmd, text=True, capture_output=True)
        print("\n".join("   " + line for line in loader.stdout.splitlines()))
        if loader.returncode != 0:
            print(loader.stderr, file=sys.stderr)
            return 1
        server.wait_healthy(timeout_s=120)
        print(f"   GET /health -> 200; time from server start to ready: {time.perf_counter() - t0:.1f} s")

        say("5. generating, then proving what is served against SGLang's own load of the same files")
        tok_ids = httpx.post(f"{server.url}/v1/tokenize", json={"prompt": PROMPT_TEXT}, timeout=30).json()["tokens"]
        result = generate_ids(server.url, tok_ids, args.new_tokens)
        print(f"   prompt            : {PROMPT_TEXT!r} -> ids {tok_ids}")
        print(f"   SGLang (pushed)   : {result['output_ids']}  weight_version={result['meta_info']['weight_version']}")
        print(f"   text              : {result['text']!r}")
        evidence = gather(server.url, ckpt, tok_ids, args.new_tokens)
        print(f"   /weights_checker checksum, pushed      : {evidence.served_checksum}")
        print(f"   /weights_checker checksum, disk reload : {evidence.disk_checksum}")
        print(f"   greedy ids after SGLang's disk reload   : {evidence.disk_ids}")
        print(
            f"   HF teacher-forced rank of each SGLang token (0 = HF's first choice, < {HF_TOP_K} agrees): "
            f"{evidence.hf_ranks}"
        )

    say("6. the same files loaded by SGLang without the plugin (SGLANG_PLUGINS leaves it out): an untouched reference")
    plain = plain_reference(ckpt, work / "plain_server.log", tok_ids, args.new_tokens)
    same = plain.checksum == evidence.served_checksum and plain.ids == evidence.served_ids
    print(f"   /weights_checker checksum, no plugin   : {plain.checksum}")
    print(f"   greedy ids, no plugin                  : {plain.ids}")
    print(f"   pushed server equal to it              : {'yes' if same else 'NO'}")

    say("7. stopped the servers")
    left = server.group_pids() + plain.left
    left_files = sorted(set(leftovers()) - before)
    print(f"   server processes left: {left or 'none'}; our shared memory / sockets left: {left_files or 'none'}")
    clean = not left and not left_files
    ok = evidence.ok and same
    reference = "equal to" if same else "DIFFERENT from"
    print(
        f"\nVERDICT {'PASS' if ok else 'FAIL'}: {evidence.findings()}; {reference} a server without the plugin; "
        f"{'nothing' if clean else 'SOMETHING'} left behind",
        flush=True,
    )
    if ok and clean and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)  # a failed run keeps its checkpoint and server log to look at
    return 0 if ok and clean else 1


@dataclass
class PlainReference:
    checksum: str
    ids: list[int]
    left: list[int]  # its processes still running after it stopped


def plain_reference(ckpt: Path, log: Path, prompt_ids: list[int], new_tokens: int) -> PlainReference:
    """SGLang alone (our plugin excluded by SGLang's own allow-list) loading ``ckpt`` with --load-format auto."""
    plain = SGLangServer(ckpt, log, wait_for_weights=False, env={"SGLANG_PLUGINS": PLUGIN_FREE})
    with plain:
        plain.wait_healthy()
        if "ckpt_plugin" in httpx.get(f"{plain.url}/model_info", timeout=30).json():
            raise RuntimeError("the reference server runs sglang-ckpt-plugin: SGLANG_PLUGINS did not leave it out")
        reference = PlainReference(
            checksum(plain.url), generate_ids(plain.url, prompt_ids, new_tokens)["output_ids"], []
        )
    reference.left = plain.group_pids()
    return reference


if __name__ == "__main__":
    sys.exit(main())
