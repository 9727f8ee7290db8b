"""Push tensors a trainer already holds into an SGLang server on the same node, through the loader's
shared-memory buckets and wire protocol (no torch.distributed group, no pickling, no checkpoint files).

The pusher keeps its bucket buffers for its whole life (unnamed shared memory, see ``ShmBuffer(reusable=True)``),
so after the first push every update costs one copy into the bucket (trainer) and one copy out of it (server),
overlapped. With ``--tp N`` every TP rank maps the same buffers: each bucket is written once for all of them.
On GPUs the buffers are CUDA IPC buffers on the server's (first) GPU, which every TP rank reads peer to peer, and
the whole update goes in one bucket where memory allows: one exchange; each push shares fresh storages of the same
sizes (the same blocks, from torch's cache), since torch keeps one IPC record per share until a storage is freed.

    from sglang_ckpt_plugin.local_push import LocalPush

    with LocalPush("http://127.0.0.1:30000") as pusher:
        pusher.push(model.state_dict().items(), weight_version="step-7")    # stage, then commit

        staged = pusher.stage(model.state_dict().items())   # or: the two phases apart (the server keeps serving)
        ...                                                 # train on; the bytes are in the pusher's buffers
        pusher.commit(staged, weight_version="step-8")      # the pause clients see is this alone
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .loader.checkpoint import TensorInfo, dtype_name
from .loader.http import ServerClient, ServerError
from .loader.node_feed import NodeFeeder
from .loader.plan import Bucket, align_up, plan_buckets, staging_budget, staging_problem
from .loader.push import PushError, RankFeeder, StageTimes, new_update_id
from .loader.rank_setup import available_memory
from .placement import LoaderPlacement, ServerPlacement, choose_placement, node_local_problem
from .trainer import PushStats
from .transport.channel import make_endpoint
from .transport.handles import allocate_buffer, return_cached_device_memory, visible_gpu_keys

MiB = 1 << 20
DEFAULT_BUCKET_BYTES = 64 * MiB
ONE_EXCHANGE_SHARE = 0.25  # of the GPU's free memory: the most a whole-update buffer, kept by the pusher, may take


def local_bucket_bytes(requested: int | None, total: int, largest: int, buffer_kind: str, free_bytes: int) -> int:
    """The pusher's bucket size: ``requested`` (at least the largest tensor); else, with buffers on a GPU, the
    whole update in one bucket where it takes at most ONE_EXCHANGE_SHARE of the GPU's free memory: one exchange
    with the server (one handle, one bucket message, one ``load_weights``) instead of a round trip per bucket,
    which is what a push costs on a GPU; else DEFAULT_BUCKET_BYTES. Shared memory stages every bucket in a buffer
    of its own anyway, so its buckets keep the default size (the server checks each while the next is filled)."""
    if requested is not None:
        return max(align_up(requested), align_up(largest))
    if buffer_kind == "cuda" and total <= free_bytes * ONE_EXCHANGE_SHARE:
        return max(align_up(total), align_up(largest))
    return max(DEFAULT_BUCKET_BYTES, align_up(largest))


class TensorFiller:
    """Fills a bucket from in-memory tensors (any device) instead of files."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def fill(self, bucket: Bucket, owned) -> None:
        """Returns once the bytes are in the OwnedBuffer: copies onto a GPU are asynchronous, and the next step
        tells the server to read them."""
        buffer = owned.tensor
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
    server_load_s: float = 0.0  # streaming: the server's load_weights over all buckets
    stage_s: float = 0.0  # two phases: staging, while the server kept serving
    commit_s: float = 0.0  # two phases: the commit (the pause clients see)


@dataclass
class StagedPush:
    """An update every TP rank has staged; ``LocalPush.commit`` swaps it in."""

    update_id: str
    stats: LocalPushStats


class LocalPush:
    def __init__(
        self,
        url: str,
        *,
        bucket_bytes: int | None = None,
        num_buffers: int = 2,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        device: torch.device | str = "auto",
        two_phase: str = "auto",
    ):
        """``device``: where the bucket buffers live. ``auto`` follows the server (placement.py): CUDA IPC on the
        server's GPU (TP rank 0's, every rank reading it peer to peer) when this process sees its GPUs and they
        read each other's memory, else shared memory (which every TP rank maps; a CUDA rank copies from it to its
        GPU). ``bucket_bytes``: None picks (``local_bucket_bytes``): on a GPU the whole update in one bucket where
        memory allows. ``two_phase``: "auto" stages every push (a buffer per bucket, kept across pushes) where shared
        memory allows and streams otherwise; "on" refuses to stream; "off" always streams through ``num_buffers``
        buffers."""
        if two_phase not in ("auto", "on", "off"):
            raise ValueError(f"LocalPush: two_phase must be auto, on or off, not {two_phase!r}")
        self.two_phase = two_phase
        self._staged: StagedPush | None = None
        self.client = ServerClient(url, timeout_s=timeout_s, api_key=api_key)
        self.bucket_bytes = bucket_bytes
        self.num_buffers = num_buffers
        self.timeout_s = timeout_s
        self.device_choice = str(device).split(":")[0]
        if self.device_choice not in ("auto", "cpu", "cuda"):
            raise ValueError(f"LocalPush: device must be auto, cpu or cuda, not {device!r}")
        self.device: torch.device | None = None
        self.buffers: list = []
        self.tp_size: int | None = None
        self.rank_keys: list[str] = []

    def __enter__(self) -> LocalPush:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._staged is not None:  # the server lets go of a staged update now, not at its timeout
            self.abort(self._staged)
        self._drop_buffers()
        if self.device is not None and self.device.type == "cuda":
            return_cached_device_memory()  # on close and when the buffers are made again, larger

    def _place(self) -> None:
        """Once, at the first push: follow where the server's ranks run."""
        server = ServerPlacement.from_model_info(self.client.wait_until_listening())
        self.tp_size = server.tp_size
        choice = self.device_choice
        gpus = visible_gpu_keys() if choice != "cpu" else []
        if server.device == "cuda" and server.rank_count > 1 and choice != "cpu":
            # CUDA buffers on TP rank 0's GPU that every rank reads peer to peer, or shared memory every rank maps
            problem = node_local_problem(server, gpus)
            if problem is not None and choice == "cuda":
                raise ValueError(
                    f"LocalPush with CUDA buffers feeds a {server.shape} server only where every rank reads "
                    f"them peer to peer, and here {problem}: use device='auto' or 'cpu' (shared memory every rank "
                    "maps) or TrainerPush"
                )
            if problem is not None:
                choice = "cpu"
        places = [choose_placement(choice, server, rank, 0, gpus) for rank in range(server.rank_count)]
        self.rank_keys = [p.rank_key for p in places]
        self.device = torch.device("cuda", places[0].gpu_index) if places[0].kind == "cuda" else torch.device("cpu")

    def _ensure_buffers(self, nbytes: int, count: int) -> None:
        """Buffers kept across pushes; made again, as this push needs them, when it needs larger or more of them
        (not more of the old size: one whole-update GPU buffer must not become two)."""
        if len(self.buffers) >= count and self.buffers and self.buffers[0].nbytes >= nbytes:
            if self.device.type != "cuda":
                return
            # torch nests one more IPC record (a reference-counter slot; for its first 1000, an interprocess event)
            # into a CUDA storage each time it is shared, and keeps them all until the storage is freed: buffers
            # shared anew for every push would pile them up for the trainer's whole run. So every push shares
            # fresh storages of the same sizes, which torch's cache hands back as the same blocks once the server's
            # ranks gave their mappings back (a block a rank still maps stays out of reuse: never rewritten under
            # it).
            nbytes, count = self.buffers[0].nbytes, len(self.buffers)
            self._drop_buffers()
        else:
            self.close()
        self.buffers = [allocate_buffer(nbytes, self.device, reusable=True) for _ in range(count)]

    def _drop_buffers(self) -> None:
        for b in self.buffers:
            b.release()
        self.buffers = []

    def _plan(self, named_tensors) -> tuple[dict[str, torch.Tensor], list[TensorInfo], list[Bucket]]:
        tensors = {name: t.detach().contiguous() for name, t in named_tensors}
        if not tensors:
            raise ValueError("LocalPush: no tensors given")
        infos = [
            TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), "", 0, t.numel() * t.element_size())
            for name, t in tensors.items()
        ]
        if self.tp_size is None:
            self._place()
        total = sum(align_up(i.nbytes) for i in infos)
        largest = max(i.nbytes for i in infos)
        size = local_bucket_bytes(self.bucket_bytes, total, largest, self.device.type, self._device_free_bytes())
        return tensors, infos, plan_buckets(infos, size)

    def _device_free_bytes(self) -> int:
        """Free memory of the GPU the buffers live on, counting the buffers this pusher already holds there."""
        if self.device.type != "cuda":
            return 0
        held = sum(b.nbytes for b in self.buffers)
        return torch.cuda.mem_get_info(self.device)[0] + held

    def _stages(self, buckets: list[Bucket]) -> str | None:
        """Why this push streams instead of staging, or None (two phases)."""
        if self.two_phase == "off":
            return "two_phase='off'"
        held = sum(b.nbytes for b in self.buffers) if self.device.type == "cpu" else 0  # reused, not allocated again
        budget = staging_budget(0, available_memory(LoaderPlacement("cpu", None, ""))) + held
        return staging_problem([b.nbytes for b in buckets], 1, budget, self.device.type)

    def push(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        weight_version: str | None = None,
        flush_cache: bool = True,
        partial: bool = False,
    ) -> LocalPushStats:
        """One complete update (``partial=True``: only some parameters, on purpose): staged, then committed (the
        server pauses for the commit alone), or streamed where staging does not fit (``two_phase``)."""
        t0 = time.perf_counter()
        tensors, infos, buckets = self._plan(named_tensors)
        why = self._stages(buckets)
        if why is not None and self.two_phase == "on":
            raise ValueError(f"LocalPush(two_phase='on'): {why}")
        if why is None:
            stats = self.commit(self._stage(tensors, infos, buckets, partial), weight_version, flush_cache)
        else:
            stats = self._stream(tensors, infos, buckets, weight_version, flush_cache, partial)
        stats.seconds = time.perf_counter() - t0
        return stats

    def stage(self, named_tensors: Iterable[tuple[str, torch.Tensor]], partial: bool = False) -> StagedPush:
        """First phase alone: every bucket reaches every TP rank, which checks and keeps it; the server goes on
        serving its weights. ``commit(staged)`` then swaps them in (or ``abort(staged)``). The tensors may change
        as soon as this returns: the bytes are in the pusher's buffers."""
        tensors, infos, buckets = self._plan(named_tensors)
        why = self._stages(buckets)
        if why is not None:
            raise ValueError(f"LocalPush.stage: {why}")
        return self._stage(tensors, infos, buckets, partial)

    def _stage(self, tensors, infos, buckets, partial: bool) -> StagedPush:
        if self._staged is not None:  # its buffers are about to be refilled: the server must let go of it first
            self.abort(self._staged)
        t0 = time.perf_counter()
        self._ensure_buffers(max(b.nbytes for b in buckets), len(buckets))
        update_id = new_update_id("local")
        stats = LocalPushStats(tensors=len(infos), bytes=sum(i.nbytes for i in infos), buckets=len(buckets))
        times = StageTimes()
        with self._feeders(update_id, partial) as (node, cancelled):
            self.client.stage(dict(zip(self.rank_keys, node.endpoints)))
            try:
                self._run(node, buckets, TensorFiller(tensors), times, stats)
            except BaseException:
                self._abort_quietly(update_id)
                raise
        stats.server_load_s = times.load_s
        stats.stage_s = time.perf_counter() - t0
        self._staged = StagedPush(update_id, stats)
        return self._staged

    def commit(
        self, staged: StagedPush, weight_version: str | None = None, flush_cache: bool = True, retries: int = 2
    ) -> LocalPushStats:
        """Second phase: every TP rank loads what it staged (under SGLang's model-update lock: the pause clients
        see). A failed commit is retried from the staged bytes up to ``retries`` times."""
        if staged is not self._staged:
            raise ValueError("LocalPush.commit: that update is no longer staged (committed, aborted or replaced)")
        t0 = time.perf_counter()
        try:
            for attempt in range(retries + 1):
                try:
                    self.client.commit(self.rank_keys, staged.update_id, weight_version, flush_cache)
                    break
                except ServerError:
                    if attempt == retries:
                        raise
        except BaseException:
            self._abort_quietly(staged.update_id)
            raise
        finally:
            self._staged = None
        staged.stats.commit_s = time.perf_counter() - t0
        return staged.stats

    def abort(self, staged: StagedPush) -> None:
        """Call a staged update off: the server drops it and keeps serving what it serves."""
        if staged is self._staged:
            self._staged = None
            self._abort_quietly(staged.update_id)

    def _abort_quietly(self, update_id: str) -> None:
        try:
            self.client.abort(self.rank_keys, update_id)
        except ServerError:
            pass  # the server releases it after SGLANG_CKPT_STAGED_TIMEOUT

    def _stream(self, tensors, infos, buckets, weight_version, flush_cache: bool, partial: bool) -> LocalPushStats:
        self._ensure_buffers(max(b.nbytes for b in buckets), min(self.num_buffers, len(buckets)))
        update_id = new_update_id("local")
        times = StageTimes()
        stats = LocalPushStats(tensors=len(infos), bytes=sum(i.nbytes for i in infos), buckets=len(buckets))
        with self._feeders(update_id, partial) as (node, cancelled):
            call = self.client.start_update(
                dict(zip(self.rank_keys, node.endpoints)), weight_version, flush_cache, cancelled
            )
            try:
                self._run(node, buckets, TensorFiller(tensors), times, stats)
            except BaseException as exc:
                cancelled.set()
                call.join_quietly()
                if isinstance(exc, PushError) and call.error:
                    raise call.error from exc  # the server's answer says why; the loader side only that it stopped
                raise
            call.join()
        stats.server_load_s = times.load_s
        return stats

    @contextlib.contextmanager
    def _feeders(self, update_id: str, partial: bool):
        """One RankFeeder per TP rank, driven as one NodeFeeder on the pusher's buffers (which outlive the update);
        aborted (if still open) and closed on the way out."""
        cancelled = threading.Event()
        node = NodeFeeder()
        try:
            for key in self.rank_keys:
                endpoint = make_endpoint(update_id, key)
                node.add(RankFeeder(endpoint, update_id, self.timeout_s, cancelled, partial=partial))
            node.adopt(self.buffers)
            try:
                yield node, cancelled
            except BaseException as exc:
                node.abort(str(exc))
                raise
        finally:
            node.close()

    @staticmethod
    def _run(node: NodeFeeder, buckets: list[Bucket], filler: TensorFiller, times: StageTimes, stats) -> None:
        node.run(buckets, filler.fill, times)
        stats.fill_s += times.read_s
