"""Push tensors a trainer already holds into an SGLang server on the same node, through the loader's
shared-memory buckets and wire protocol (no torch.distributed group, no pickling, no checkpoint files).

The pusher keeps its bucket buffers for its whole life (unnamed shared memory, see ``ShmBuffer(reusable=True)``),
so after the first push every update costs one copy into the bucket (trainer) and one copy out of it (server),
overlapped. With ``--tp N`` every TP rank maps the same buffers: each bucket is written once for all of them.

    from sglang_ckpt_plugin.local_push import LocalPush

    with LocalPush("http://127.0.0.1:30000") as pusher:
        pusher.push(model.state_dict().items(), weight_version="step-7")
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from .loader.checkpoint import TensorInfo, dtype_name
from .loader.http import ServerClient
from .loader.plan import Bucket, align_up, plan_buckets
from .loader.push import PushError, RankFeeder, StageTimes, new_update_id
from .placement import ServerPlacement, choose_placement
from .transport.channel import make_endpoint
from .trainer import PushStats
from .transport.handles import allocate_buffer, visible_gpu_keys

MiB = 1 << 20


class TensorFiller:
    """Fills a bucket from in-memory tensors (any device) instead of files."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def fill(self, bucket: Bucket, buffer: torch.Tensor) -> None:
        """Returns once the bytes are in ``buffer``: copies onto a GPU are asynchronous, and the next step
        tells the server to read them."""
        gpus = {buffer.device} if buffer.is_cuda else set()
        for slot in bucket.slots:
            src = self.tensors[slot.tensor.name]
            buffer[slot.offset : slot.offset + slot.tensor.nbytes].copy_(src.reshape(-1).view(torch.uint8))
            if src.is_cuda:
                gpus.add(src.device)
        for device in gpus:  # a copy between two GPUs runs on one of their streams
            torch.cuda.synchronize(device)


@dataclass
class LocalPushStats(PushStats):
    fill_s: float = 0.0  # trainer: tensors -> bucket buffers
    server_load_s: float = 0.0


class LocalPush:
    def __init__(self, url: str, *, bucket_bytes: int = 64 * MiB, num_buffers: int = 2, api_key: str | None = None,
                 timeout_s: float = 600.0, device: torch.device | str = "auto"):  # fmt: skip
        """``device``: where the bucket buffers live. ``auto`` follows the server (placement.py): CUDA IPC on the
        server's GPU when it runs one TP rank on a GPU this process sees, else shared memory (which every TP
        rank maps; a CUDA rank copies from it to its GPU)."""
        self.client = ServerClient(url, timeout_s=timeout_s, api_key=api_key)
        self.bucket_bytes = align_up(bucket_bytes)
        self.num_buffers = num_buffers
        self.timeout_s = timeout_s
        self.device_choice = str(device).split(":")[0]
        if self.device_choice not in ("auto", "cpu", "cuda"):
            raise ValueError(f"LocalPush: device must be auto, cpu or cuda, not {device!r}")
        self.device: torch.device | None = None
        self.buffers: list = []
        self.tp_size: int | None = None
        self.rank_keys: list[str] = []

    def __enter__(self) -> "LocalPush":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for b in self.buffers:
            b.release()
        self.buffers = []
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.ipc_collect()  # free the device memory the server's mappings held on to

    def _place(self) -> None:
        """Once, at the first push: follow where the server's ranks run."""
        server = ServerPlacement.from_model_info(self.client.wait_until_listening())
        self.tp_size = server.tp_size
        choice = self.device_choice
        if server.device == "cuda" and server.tp_size > 1:
            if choice == "cuda":
                raise ValueError("LocalPush with CUDA buffers feeds one TP rank on one GPU; this server has "
                                 f"tp={server.tp_size}: use device='auto' or 'cpu' (shared memory every rank maps) "
                                 "or TrainerPush")  # fmt: skip
            choice = "cpu"
        gpus = visible_gpu_keys() if choice != "cpu" else []
        places = [choose_placement(choice, server, rank, 0, gpus) for rank in range(server.tp_size)]
        self.rank_keys = [p.rank_key for p in places]
        self.device = torch.device("cuda", places[0].gpu_index) if places[0].kind == "cuda" else torch.device("cpu")

    def _ensure_buffers(self, nbytes: int) -> None:
        if self.buffers and self.buffers[0].nbytes >= nbytes:
            return
        self.close()  # a larger tensor than ever before: grow once
        self.buffers = [allocate_buffer(nbytes, self.device, reusable=True) for _ in range(self.num_buffers)]

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None,
             flush_cache: bool = True, partial: bool = False) -> LocalPushStats:  # fmt: skip
        """One complete update (``partial=True``: only some parameters, on purpose)."""
        t0 = time.perf_counter()
        tensors = {name: t.detach().contiguous() for name, t in named_tensors}
        if not tensors:
            raise ValueError("LocalPush.push: no tensors given")
        infos = [TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), "", 0, t.numel() * t.element_size())
                 for name, t in tensors.items()]  # fmt: skip
        size = max(self.bucket_bytes, align_up(max(i.nbytes for i in infos)))
        buckets = plan_buckets(infos, size)
        if self.tp_size is None:
            self._place()
        self._ensure_buffers(max(b.nbytes for b in buckets))

        update_id = new_update_id("local")
        cancelled = threading.Event()
        feeders = []
        times = [StageTimes() for _ in range(self.tp_size)]
        stats = LocalPushStats()
        try:
            for key in self.rank_keys:
                feeder = RankFeeder(make_endpoint(update_id, key), update_id, self.timeout_s, cancelled, partial=partial)
                feeder.adopt(self.buffers)
                feeders.append((key, feeder))
            call = self.client.start_update({k: f.channel.endpoint for k, f in feeders}, weight_version, flush_cache,
                                            cancelled)  # fmt: skip
            try:
                self._run(feeders, buckets, TensorFiller(tensors), times, stats)
            except BaseException as exc:
                for _, f in feeders:
                    f.abort(str(exc))
                cancelled.set()
                call.join_quietly()
                raise (call.error if isinstance(exc, PushError) and call.error else exc)
            call.join()
        finally:
            for _, f in feeders:
                f.close()
        stats.tensors, stats.bytes, stats.buckets = len(infos), sum(i.nbytes for i in infos), len(buckets)
        stats.server_load_s = max(t.load_s for t in times)
        stats.seconds = time.perf_counter() - t0
        return stats

    @staticmethod
    def _run(feeders, buckets: list[Bucket], filler: TensorFiller, times: list[StageTimes], stats) -> None:
        """Every rank gets the same buffer for a bucket: it is refilled once every rank has acknowledged."""
        for _, f in feeders:
            f.hello(buckets)
        for seq, bucket in enumerate(buckets):
            buffer = None
            for (_, f), t in zip(feeders, times):
                buffer = f.free_buffer(seq, t)
            t_fill = time.perf_counter()
            filler.fill(bucket, buffer)
            stats.fill_s += time.perf_counter() - t_fill
            for (_, f), t in zip(feeders, times):
                f.send_bucket(seq, bucket, None, t)
        for (_, f), t in zip(feeders, times):
            f.finish(len(buckets), t)
