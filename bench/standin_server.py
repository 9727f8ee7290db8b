"""A stand-in for an SGLang server, for the device check where SGLang cannot be installed (``--no-sglang``).

It speaks the HTTP the loader needs (``/model_info``, ``/update_weights_from_ipc``) and serves each update with
the plugin's real receiver (``ReceiveSession``) in this process, on ``--device``, loading into a plain torch
module whose parameters are made from the checkpoint's header. ``/digests`` gives xxh3 of every parameter's bytes
and ``/memory`` this device's free memory and the mappings the receiver parked, so the check can prove byte
identity and that nothing was kept. ``POST /fail_next`` makes updates fail in the dry run or in the load until cleared
(bench/leak_check.py).

    python bench/standin_server.py --checkpoint DIR --device cuda --port 31000

Stdlib HTTP, one request at a time: the loader's update call is the only long one (two phases: its stage call
returns at once, the receiver runs on a thread, the commit loads what was staged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sglang_ckpt_plugin.loader.checkpoint import dtype_name, read_checkpoint  # noqa: E402
from sglang_ckpt_plugin.server import receiver, staging  # noqa: E402
from sglang_ckpt_plugin.server.receiver import ReceiveSession  # noqa: E402
from sglang_ckpt_plugin.server.validate import CheckedUpdate  # noqa: E402
from sglang_ckpt_plugin.transport.handles import device_rank_key  # noqa: E402
from sglang_ckpt_plugin.transport.integrity import tensor_digest  # noqa: E402
from sglang_ckpt_plugin.transport.messages import PHASE_KEY  # noqa: E402


class Weights:
    """The served "model": one parameter per checkpoint tensor, on the device, filled with a marker at start and
    at every ``reset()`` (``POST /reset``: before each variant, so a push that wrote nothing cannot pass)."""

    MARKER = 7

    def __init__(self, checkpoint: Path, device: torch.device):
        self.device = device
        self.params = {
            t.name: torch.full(t.shape, self.MARKER, dtype=getattr(torch, t.dtype), device=device)
            for t in read_checkpoint(checkpoint)
        }
        self.version: str | None = None
        self.fail_at: str | None = None  # "validate" or "load": updates fail there until cleared (POST /fail_next)

    def reset(self) -> None:
        for param in self.params.values():
            param.fill_(self.MARKER)
        self.version = None

    def validate(self, manifest, partial: bool, allow_unused: bool) -> CheckedUpdate:
        """The receiver's dry run: every name known, dtype and shape as served; coverage per parameter."""
        if self.fail_at == "validate":
            raise ValueError("refused by the stand-in (POST /fail_next), as a checkpoint that does not fit")
        for name, dtype, shape in manifest:
            param = self.params.get(name)
            if param is None:
                raise ValueError(f"{name!r} is not a parameter of this model")
            if (dtype, list(shape)) != (dtype_name(param.dtype), list(param.shape)):
                raise ValueError(
                    f"{name!r} is {dtype} {list(shape)}, the model has {dtype_name(param.dtype)} {list(param.shape)}"
                )
        names = {name for name, _, _ in manifest}
        if not partial and names != set(self.params):
            raise ValueError(f"the update does not cover {len(set(self.params) - names)} parameters")
        return CheckedUpdate({name: ((0, self.params[name].nbytes),) for name in names})

    def load_weights(self, weights) -> None:
        if self.fail_at == "load":
            held = list(weights)  # as a model's loader holds its arguments when it raises
            raise KeyError(f"the stand-in's load_weights fails (POST /fail_next) on {held[0][0]!r}")
        for name, tensor in weights:
            self.params[name].copy_(tensor)  # D2D from a CUDA IPC view, H2D from shared memory

    def post_process(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def digests(self) -> dict[str, str]:
        return {name: f"{tensor_digest(p.reshape(-1).view(torch.uint8).cpu()):016x}" for name, p in self.params.items()}

    def memory(self) -> dict:
        """This device's free memory, and the loader mappings the receiver parked for good (a model kept views)."""
        parked = len(receiver._KEPT_ALIVE)
        if self.device.type != "cuda":
            return {"free_bytes": None, "allocated_bytes": None, "reserved_bytes": None, "kept_alive": parked}
        torch.cuda.synchronize(self.device)
        return {
            "free_bytes": torch.cuda.mem_get_info(self.device)[0],
            "allocated_bytes": torch.cuda.memory_allocated(self.device),
            "reserved_bytes": torch.cuda.memory_reserved(self.device),
            "kept_alive": parked,
        }


def make_handler(weights: Weights, key: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/model_info":
                self._reply(
                    200,
                    {
                        "weight_version": weights.version,
                        "ckpt_plugin": {
                            "device": weights.device.type,
                            "rank_keys": [key],
                            "tp_size": 1,
                            "dp_size": 1,
                            "pp_size": 1,
                        },
                    },
                )
            elif self.path == "/digests":
                self._reply(200, weights.digests())
            elif self.path == "/memory":
                self._reply(200, weights.memory())
            else:
                self._reply(404, {"message": "not here"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/reset":
                weights.reset()
                self._reply(200, {"success": True, "message": "every parameter holds the marker again"})
                return
            if self.path == "/fail_next":
                weights.fail_at = body["at"]  # a commit retried from the staged bytes fails again
                self._reply(200, {"success": True, "message": f"updates fail at {body['at']} until cleared"})
                return
            if self.path != "/update_weights_from_ipc":
                self._reply(404, {"success": False, "message": "not here"})
                return
            handles = dict(body.get("zmq_handles") or {})
            phase = handles.pop(PHASE_KEY, None)  # two phases as the plugin serves them (server/staging.py)
            if key not in handles:
                self._reply(400, {"success": False, "message": f"no endpoint for {key} in {sorted(handles)}"})
                return
            t0 = time.perf_counter()
            try:
                if phase == "abort":
                    staging.abort(handles[key])
                    self._reply(200, {"success": True, "message": "dropped"})
                    return
                session = (
                    ReceiveSession(
                        handles[key],
                        weights.device,
                        weights.load_weights,
                        weights.post_process,
                        idle_timeout_s=120,
                        validate=weights.validate,
                        staging=phase == "stage",
                    )
                    if phase != "commit"
                    else None
                )
                if phase == "stage":
                    staging.start(session)  # receives in the background; the loader hears per bucket
                    self._reply(200, {"success": True, "message": "staging"})
                    return
                stats = staging.commit(handles[key])[1] if phase == "commit" else session.run()
            except Exception as exc:  # the loader prints it
                self._reply(400, {"success": False, "message": f"{type(exc).__name__}: {exc}"})
                return
            weights.version = body.get("weight_version")
            self._reply(
                200,
                {
                    "success": True,
                    "message": f"loaded {stats.tensors} tensors ({stats.bytes} bytes) in "
                    f"{stats.buckets} buckets, {time.perf_counter() - t0:.3f} s",
                },
            )

    return Handler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--start-delay",
        type=float,
        default=0.0,
        help="seconds before it answers (a real server's start: model init, CUDA graphs)",
    )
    a = p.parse_args()
    time.sleep(a.start_delay)
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    weights = Weights(Path(a.checkpoint), device)
    server = HTTPServer(("127.0.0.1", a.port), make_handler(weights, device_rank_key(device, 0)))
    print(f"[standin] serving {len(weights.params)} parameters on {device} at http://127.0.0.1:{a.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
