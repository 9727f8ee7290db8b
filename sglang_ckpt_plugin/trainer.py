"""Push weights from a trainer process into a running SGLang server over torch.distributed.

The trainer is rank 0 of a group that the server's TP ranks join through SGLang's own
``/init_weights_update_group``; each update is a ``/begin_weight_update`` … ``/end_weight_update`` session
in which every bucket of tensors is announced with ``/update_weights_from_distributed`` (SGLang's
``flattened_bucket`` format: tensors packed back to back) and broadcast by the trainer. gloo on CPU, NCCL on
CUDA. Works with or without sglang-ckpt-plugin on the server; with the plugin a server started with
``--wait-for-initial-weights`` becomes ready when a session that covered every parameter ends.

    from sglang_ckpt_plugin.trainer import TrainerPush

    with TrainerPush("http://127.0.0.1:30000") as pusher:      # group set-up
        pusher.push(model.named_parameters(), weight_version="step-100")
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .loader.http import ServerClient, ServerError, UpdateCall, free_port
from .placement import ServerPlacement, trainer_gpu
from .server import sglang_compat as sg
from .transport.handles import visible_gpu_keys

MiB = 1 << 20


@dataclass
class PushStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
    """Group tensors, in order, into lists of at most ``bucket_bytes`` (a larger tensor goes alone).

    A tensor whose byte offset would not be a multiple of its element size starts a new bucket, because the
    receiver views the packed bytes as that dtype.
    """
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or size % tensor.element_size()):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def wait_for_broadcast(work, call: UpdateCall, poll_s: float = 0.002) -> str | None:
    """Wait until the broadcast completes (None), or the server's answer says it refused the bucket before joining
    it (the reason): then the broadcast never completes, and waiting for it would hang."""
    while not work.is_completed():
        if call.finished() and call.error is not None:
            return str(call.error)
        time.sleep(poll_s)
    work.wait()  # raises the group's own error, if it failed
    return None


class TrainerPush:
    def __init__(
        self,
        url: str,
        *,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        backend: str | None = None,
        group_name: str = "weight_update_group",
        bucket_bytes: int = 256 * MiB,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        device: torch.device | str | None = None,
    ):
        """``device``: where this trainer's send buffer lives; by default it follows the server (placement.py): a GPU
        none of the server's TP ranks uses when the server runs on CUDA (NCCL refuses two ranks of one group on one
        GPU), the CPU (gloo) when the server runs on CPU."""
        self.client = ServerClient(url, timeout_s=timeout_s, api_key=api_key)
        self.device = torch.device(device) if device is not None else None
        self.backend = backend
        self.master_addr = master_addr
        self.master_port = master_port or free_port(master_addr)
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.group = None
        self._send_buffer: torch.Tensor | None = None

    # ------------------------------------------------------------------ group
    def connect(self) -> TrainerPush:
        """Create the group: this process is rank 0, the server's TP ranks are 1..tp (same call on both sides)."""
        server = ServerPlacement.from_model_info(self.client.wait_until_listening())
        if server.dp_size > 1 or server.pp_size > 1 or server.attn_dp_size > 1:
            raise ValueError(
                f"TrainerPush joins SGLang's own weights-update group, which SGLang 0.5.23 builds for one replica "
                f"of TP ranks; this server runs {server.shape} ({server.attn_dp_size} attention group(s)), a layout no "
                "test has run it on: push with LocalPush or python -m sglang_ckpt_plugin.update"
            )
        tp_size = server.tp_size
        self.device = self._choose_device(server)
        self.backend = self.backend or ("nccl" if self.device.type == "cuda" else "gloo")
        body = {
            "master_address": self.master_addr,
            "master_port": self.master_port,
            "rank_offset": 1,
            "world_size": 1 + tp_size,
            "group_name": self.group_name,
            "backend": self.backend,
        }
        call = UpdateCall(self.client, body, threading.Event(), path="/init_weights_update_group")
        with self._on_device():
            self.group = sg.trainer_process_group(
                self.backend,
                f"tcp://{self.master_addr}:{self.master_port}",
                1 + tp_size,
                self.group_name,
                self.timeout_s,
            )
        call.join()
        return self

    def _choose_device(self, server: ServerPlacement) -> torch.device:
        if server.device == "cpu" or (server.device is None and not torch.cuda.is_available()):
            if self.device is not None and self.device.type == "cuda":
                raise ValueError("the server runs on CPU (gloo): push from CPU tensors, device='cpu'")
            return torch.device("cpu")
        gpus = visible_gpu_keys()
        if not gpus or (self.device is not None and self.device.type != "cuda"):
            raise ValueError(
                "the server runs on CUDA, so its weight-update group is NCCL: push from a GPU of this "
                "process that the server does not use"
            )
        if self.device is None or self.device.index is None:
            current = torch.cuda.current_device()  # the trainer's own GPU, unless a server rank uses it
            index = current if gpus[current] not in server.rank_keys else trainer_gpu(server, gpus)
        else:
            index = self.device.index
            if index >= len(gpus):
                raise ValueError(f"cuda:{index}: this process sees {len(gpus)} GPUs")
            if gpus[index] in server.rank_keys:
                raise ValueError(
                    f"cuda:{index} ({gpus[index]}) is a GPU of the server's TP ranks: an NCCL group "
                    "cannot hold two ranks on one GPU; pick another GPU"
                )
        # No set_device: the trainer's own "cuda" allocations stay on its GPU; our GPU work runs under
        # torch.cuda.device(self.device) (_on_device), where NCCL takes its device from.
        return torch.device("cuda", index)

    def _on_device(self):
        """The push GPU as current device for the group's set-up and each bucket, and only for them."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def close(self) -> None:
        if self.group is None:
            return
        try:
            self.client.post("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            dist.destroy_process_group(self.group)
            self.group = None

    def __enter__(self) -> TrainerPush:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ updates
    def push(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        weight_version: str | None = None,
        flush_cache: bool = True,
    ) -> PushStats:
        """One update: every tensor, in buckets, inside one weight-update session."""
        if self.group is None:
            raise RuntimeError("call connect() (or use TrainerPush as a context manager) before push()")
        stats = PushStats()
        t0 = time.perf_counter()
        buckets = list(pack_buckets(((n, t.detach()) for n, t in named_tensors), self.bucket_bytes))
        self.client.post("/begin_weight_update", {})
        try:
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1
                self._push_bucket(bucket, weight_version if last else None, flush_cache and last)
                stats.tensors += len(bucket)
                stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                stats.buckets += 1
        finally:
            self.client.post("/end_weight_update", {})  # always close the session, even after a failure
        stats.seconds = time.perf_counter() - t0
        return stats

    def _push_bucket(self, bucket, weight_version: str | None, flush_cache: bool) -> None:
        body = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name,
            "load_format": sg.FLATTENED_BUCKET_FORMAT,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            body["weight_version"] = weight_version
        with self._on_device():
            flat = self._pack(bucket)
            call = UpdateCall(self.client, body, threading.Event(), path="/update_weights_from_distributed")
            work = dist.broadcast(flat, src=0, group=self.group, async_op=True)
            refusal = wait_for_broadcast(work, call)
        if refusal is not None:
            self._abandon_group()
            raise ServerError(
                f"the server refused a bucket before receiving it ({refusal}); the weight-update group was torn "
                "down (its broadcast can never complete): call connect() to push again"
            )
        call.join()

    def _abandon_group(self) -> None:
        """A broadcast the server never joined stays queued on the group (NCCL: on the trainer's stream, where the
        next GPU op would wait for the watchdog). Abort the group's communicators, drop the server's side of it."""
        group, self.group = self.group, None
        self.master_port = free_port(self.master_addr)  # the next connect() rendezvouses afresh
        try:
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            abort(group) if abort is not None and self.backend == "nccl" else dist.destroy_process_group(group)
        except Exception:  # a group stuck in a collective may refuse to go quietly: it is dropped all the same
            pass
        try:
            self.client.post("/destroy_weights_update_group", {"group_name": self.group_name})
        except ServerError:
            pass

    def _pack(self, bucket) -> torch.Tensor:
        """Copy the bucket's tensors back to back into one reused send buffer."""
        total = sum(t.numel() * t.element_size() for _, t in bucket)
        if self._send_buffer is None or self._send_buffer.numel() < total:
            self._send_buffer = torch.empty(max(total, self.bucket_bytes), dtype=torch.uint8, device=self.device)
        flat = self._send_buffer[:total]
        offset = 0
        for _, t in bucket:
            n = t.numel() * t.element_size()
            flat[offset : offset + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
            offset += n
        return flat


__all__ = ["TrainerPush", "PushStats", "ServerError", "pack_buckets"]
