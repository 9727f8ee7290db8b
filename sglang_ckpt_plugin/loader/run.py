"""One update, end to end, on every loader rank: plan, check the server, move buckets, push, report.

Every rank walks the same steps; after each local step that can fail, the ranks agree (one small gloo
all-reduce) so that one rank's error stops all of them at the same point instead of leaving the others in a
collective. With one rank there is nothing to agree on and no torch.distributed at all; where the server maps the
checkpoint files itself (one rank, CPU: page-cache mode) nothing imports torch, so the push starts at once.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..placement import LoaderPlacement
from ..transport.channel import make_endpoint
from .checkpoint import CheckpointError, read_update
from .http import PLUGIN_MARKER, ServerClient, ServerError, layout_mismatch
from .metas import load_metas, save_metas
from .node_feed import NodeFeeder
from .options import LoaderOptions
from .plan import (
    mappable,
    parse_ranks,
    plan_file_buckets,
    plan_world,
    shard_by_bytes,
    staging_budget,
    staging_problem,
)
from .push import PushError, RankFeeder, StageTimes, new_update_id
from .rank_setup import PeerFailed, available_memory, torch_device
from .read_ahead import ReadAhead
from .reader import CheckpointReader
from .route import Feeding, Route
from .world import Control, LoaderWorld

if TYPE_CHECKING:
    import torch


def update_rounds(method: str, ranks: str | None, world: LoaderWorld, feeding: Feeding) -> list[list[int]]:
    """The receiving loader ranks of each update this run makes (``all``: broadcast, then p2p)."""
    everyone = feeding.feeders
    if method == "broadcast":
        return [everyone]
    if method == "p2p":
        return [parse_ranks(ranks, world.world_size, world.parallel_size)]
    rounds = [everyone]
    if ranks:
        rounds.append(parse_ranks(ranks, world.world_size, world.parallel_size))
    return rounds


UPDATE_ERRORS = (CheckpointError, ServerError, PushError, ValueError, OSError, RuntimeError)


class Update:
    """One update from this rank's point of view (a source, a receiver feeding its inference ranks, or both)."""

    def __init__(
        self,
        args: LoaderOptions,
        world: LoaderWorld,
        control: Control,
        placement: LoaderPlacement,
        route: Route,
        rank_keys: list[str],
        receivers: list[int],
        asked: dict,
    ):
        self.args = args
        self.asked = asked
        self.placement = placement  # where this process's buffers live
        self.route = route  # who feeds which server rank, and how the bytes may travel
        self.rank_keys = rank_keys  # the server ranks this process feeds (from the server's /model_info)
        self.world = world
        self.control = control
        self.receivers = receivers
        self.receives = world.rank in receivers
        self.leads = self.receives and world.is_leader
        self.times = StageTimes()
        self.cancelled = threading.Event()
        self.reader = CheckpointReader()
        self.feeder: NodeFeeder | None = None
        self.exchange = None
        self.mapped = False
        self.http = None
        self.two_phase = False
        self.staged_call_made = False
        self.commit_message = ""

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed: its own error here, PeerFailed elsewhere."""
        if self.control.any_failed(error is not None):
            raise error or PeerFailed("another loader rank failed (its error is printed above)")

    def guarded(self, fn):
        """Run ``fn`` on this rank, then agree on success across ranks."""
        error, result = None, None
        try:
            result = fn()
        except UPDATE_ERRORS as exc:
            error = exc
        self.agree(error)
        return result

    def run(self) -> None:
        t_start = time.perf_counter()
        if self.placement.kind == "cuda" and self.world.distributed:
            self.make_exchange()  # NCCL's communicator and p2p connections take GPU memory: make them, then measure
        # auto bucket sizes must be identical on every rank: the smallest free memory decides
        self.memory_budget = min(self.control.all_gather_int(available_memory(self.placement)))
        steps, bucket_bytes = self.guarded(self.plan)
        self.steps = steps
        self.two_phase = self.choose_phases(steps)  # the same answer on every rank (from the same plan and budget)
        t_plan = time.perf_counter()
        self.guarded(self.check_server)
        t_listening = time.perf_counter()
        try:
            try:
                self.share_names()
                staged_buffers = self.two_phase and not self.mapped
                self.guarded(lambda: self.bind(listen=not staged_buffers))
                if not self.two_phase:
                    self.start_call()  # a streaming update's call lasts as long as the transfer
                if self.mapped:
                    t_buffers = time.perf_counter()
                    if self.two_phase:
                        self.guarded(self.stage_call)
                    self.push_mapped()
                else:
                    num_buffers = len(steps) if self.two_phase else min(self.args.num_buffers, len(steps))
                    self.guarded(lambda: self.allocate(bucket_bytes, num_buffers))
                    t_buffers = time.perf_counter()
                    self.push(steps)
                t_pushed = time.perf_counter()
                self.guarded(lambda: self.http.join() if self.http is not None else None)
                t_done = time.perf_counter()
            except BaseException as exc:
                if self.feeder is not None:
                    self.feeder.abort(str(exc))
                self.cancelled.set()
                self.abort_staged()
                if self.http is not None:
                    self.http.join_quietly()
                    if isinstance(exc, PushError) and self.http.error:
                        raise self.http.error from None
                raise
            if self.two_phase:  # every rank of every instance has staged and checked its bytes: commit together
                try:
                    self.commit()
                except BaseException:
                    self.abort_staged()
                    raise
        finally:
            if self.feeder is not None:  # after the commit: the server copies out of these buffers
                self.feeder.close()
            self.reader.close()
            self.release_device_memory()
        phase = (
            {
                "stage (the server kept serving)": t_done - t_buffers,  # read, exchange, hand over, checked
                "commit (the pause)": time.perf_counter() - t_done,
            }
            if self.two_phase
            else {}
        )
        self.times.extra = {
            "plan": t_plan - t_start,
            "server check": t_listening - t_plan,
            "buffers": t_buffers - t_listening,
            "server finalize": t_done - t_pushed,
            **phase,
            **self.times.extra,
        }
        self.report(time.perf_counter() - t_start)

    def choose_phases(self, steps) -> bool:
        """Two phases (stage while serving, then a short commit) where the staged bytes fit: page-cache mode stages
        nothing of its own (the checkpoint files are the staging memory); bucket buffers hold every bucket at once
        on each receiving rank. Deterministic, so every rank takes the same path without a collective."""
        mode = self.args.two_phase
        if mode == "off":
            return False
        if self.mapped:
            return True
        budget = staging_budget(self.args.staging_budget, self.memory_budget)
        reason = staging_problem(
            [s.bucket.nbytes for s in steps],
            self.route.feeding.feeders_on_node(self.world),
            budget,
            self.placement.kind,
        )
        if reason is None:
            return True
        if mode == "on":
            raise ValueError(f"--two-phase on: {reason}")
        if self.world.rank == 0:
            print(
                f"[sglang-ckpt] streaming the update (one phase; the server pauses for the whole transfer): {reason}",
                file=sys.stderr,
            )
        return False

    # ------------------------------------------------------------------ phases
    def plan(self):
        args, world = self.args, self.world
        if args.load_metas_file:
            self.checkpoint_name, shards = load_metas(args.load_metas_file, args.checkpoint_path)
            if len(shards) != world.world_size:
                raise ValueError(
                    f"{args.load_metas_file} was written by {len(shards)} loader ranks, this run has "
                    f"{world.world_size}; use as many ranks or re-plan with --checkpoint-path"
                )
        else:
            self.checkpoint_name = args.checkpoint_name
            shards = [[] for _ in range(world.world_size)]  # only the feeders read: they hold the buffers
            readers = self.route.feeding.feeders
            tensors = read_update(args.checkpoint_path, args.draft_checkpoint_path)
            for rank, shard in zip(readers, shard_by_bytes(tensors, len(readers))):
                shards[rank] = shard
        if args.save_metas_file and world.rank == 0:
            save_metas(args.save_metas_file, self.checkpoint_name, shards, args.checkpoint_path)
        steps, bucket_bytes = plan_world(shards, args.bucket_size, self.memory_budget)
        tensors = [t for shard in shards for t in shard]
        self.mapped = self.route.transfer(self.placement.kind, mappable(tensors)) == "map"
        if self.mapped:
            self.files, self.file_buckets = plan_file_buckets(tensors, bucket_bytes)
        return steps, bucket_bytes

    def check_server(self) -> None:
        if not self.leads:
            return
        args = self.args
        self.client = self.asked["client"]  # every leader asked its server in place_rank
        error = layout_mismatch(self.asked["info"], args.endpoint, args.inference_parallel_size)
        if error:
            raise ValueError(error)

    def share_names(self) -> None:
        """The update id (from rank 0), every rank's key and endpoint, the data group's first use (collectives
        only, nothing that fails: it comes before any rank allocates)."""
        world = self.world
        self.update_id = self.control.broadcast_str(new_update_id(self.checkpoint_name) if world.rank == 0 else "")
        # every server rank's key, in server-rank order (each feeder's ranks are consecutive)
        self.keys = [k for fed in self.control.all_gather_str(",".join(self.rank_keys)) for k in fed.split(",") if k]
        self.own_endpoints = [self.endpoint_of(key) for key in self.rank_keys]
        if not self.mapped and self.exchange is None:  # buckets move (torch from here on)
            self.make_exchange()

    def make_exchange(self) -> None:
        """Collective (every rank, same point), before any rank allocates."""
        from .exchange import Exchange
        from .p2p_link import open_link

        link = open_link(self.args.p2p_transport, self.receivers, self.world, self.control, self.placement.kind)
        group, alarm = self.control.data_group, self.control.alarm
        self.exchange = Exchange(self.world, self.receivers, self.device, group, alarm, link)

    def bind(self, listen: bool = True) -> None:
        """Every receiver binds its endpoint (cheap); the agreement after it orders this before any HTTP call.
        ``listen=False``: only once its buckets are read (push)."""
        if self.receives:
            args = self.args
            self.feeder = NodeFeeder()
            for endpoint in self.own_endpoints:
                feeder = RankFeeder(
                    endpoint,
                    self.update_id,
                    args.timeout,
                    self.cancelled,
                    checksum=self.checksum,
                    partial=args.partial,
                    allow_unused=args.allow_unused,
                    listen=listen,
                )
                self.feeder.add(feeder)

    def start_call(self) -> None:
        """Each instance's leader makes the HTTP call naming the endpoints of all its ranks."""
        if self.leads:
            args = self.args
            self.http = self.client.start_update(
                self.instance_endpoints(), args.weight_version, not args.no_flush_cache, self.cancelled
            )

    def endpoint_of(self, rank_key: str) -> str:
        """The ZeroMQ endpoint a server rank of this instance connects to (the same name in every process)."""
        return make_endpoint(f"{self.update_id}-i{self.world.instance}", rank_key)

    def instance_endpoints(self) -> dict[str, str]:
        """Rank key -> ZeroMQ endpoint of every rank of this instance (what its server's ranks connect to)."""
        return {self.keys[g]: self.endpoint_of(self.keys[g]) for g in self.world.instance_ranks()}

    def instance_keys(self) -> list[str]:
        return list(self.instance_endpoints())

    def stage_call(self) -> None:
        """Each instance's leader asks its server to stage: every rank starts receiving in the background and the
        call returns at once; each rank then hears of every bucket over its own channel."""
        if self.leads:
            self.staged_call_made = True  # from here on a failure drops the staged bytes on the server
            self.client.stage(self.instance_endpoints())

    def abort_staged(self) -> None:
        """After a stage call: tell the server the update is off, so it frees the staged bytes now and records why
        (best effort: a server that cannot be reached releases them after SGLANG_CKPT_STAGED_TIMEOUT)."""
        if not (self.leads and self.staged_call_made):
            return
        self.staged_call_made = False
        try:
            self.client.abort(self.instance_keys(), self.update_id)
        except ServerError as exc:
            print(f"[sglang-ckpt] could not drop the staged update on {self.args.endpoint}: {exc}", file=sys.stderr)

    def commit(self) -> None:
        """Every instance's leader commits at once; the ranks agree on the outcome. A commit that failed is retried
        from the bytes the server staged (nothing is read again), up to --commit-retries times."""
        args, error, done = self.args, None, False
        for attempt in range(1 + args.commit_retries):
            error = None
            if self.leads and not done:
                try:
                    self.commit_message = self.client.commit(
                        self.instance_keys(), self.update_id, args.weight_version, not args.no_flush_cache
                    )
                    done = True
                except ServerError as exc:
                    error = exc
                    if attempt < args.commit_retries:
                        print(
                            f"[sglang-ckpt] commit on {args.endpoint} failed (attempt {attempt + 1}): {exc}; retrying "
                            "from the staged bytes",
                            file=sys.stderr,
                        )
            if not self.control.any_failed(error is not None):
                return
        raise error or PeerFailed("another instance's commit failed (its error is printed above)")

    @functools.cached_property
    def checksum(self) -> str:
        """The digests' kind with --verify: GPU buffers are checked where they are (word sums on the device, no copy
        back), host memory with xxh3."""
        if not self.args.verify:
            return "none"
        return "wordsum" if self.placement.kind == "cuda" else "xxh3"

    @functools.cached_property
    def device(self) -> torch.device | str:
        """The buffers' device: the rank's GPU, or "cpu" (a name, not a torch.device: a CPU loader that moves
        nothing between processes never imports torch)."""
        return torch_device(self.placement) if self.placement.kind == "cuda" else "cpu"

    def release_device_memory(self) -> None:
        """The update's buffers and staging chunks go back to the device (a resident loader lives on, beside
        SGLang's KV cache, and measures the free memory again at its next update)."""
        self.filler = None
        if self.exchange is not None:
            self.exchange.release()
        if self.placement.kind == "cuda":
            from ..transport.handles import return_cached_device_memory

            return_cached_device_memory()

    def allocate(self, bucket_bytes: int, num_buffers: int) -> None:
        from .filler import BucketFiller

        if self.feeder is not None:
            self.feeder.allocate(bucket_bytes, num_buffers, self.device, borrow=self.borrows_buffers())
        owned = sum(1 for s in self.steps if s.owner == self.world.rank)
        if owned:  # a rank that reads nothing (a node's other ranks, one process feeding the node) stages nothing
            self.filler = BucketFiller(
                self.reader, self.device, bucket_bytes, checksum=self.checksum, direct_io=self.args.direct_io
            )
        self.exchange.allocate(bucket_bytes, owned if self.two_phase else min(owned, 1))
        self.exchange.register(self.feeder.buffers if self.feeder is not None else [])

    def borrows_buffers(self) -> bool:
        """Where the server keeps update buffers (``--keep-update-buffers``), this process fills those instead of
        allocating its own: host memory, the server this process asked (a leader), no Mooncake registration."""
        info = self.asked.get("info", {}).get(PLUGIN_MARKER, {}) if self.leads else {}
        return (
            self.args.use_kept_buffers == "auto"
            and self.placement.kind == "cpu"
            and bool(info.get("keeps_update_buffers"))
            and (self.exchange is None or self.exchange.link is None)
        )

    def read_ahead(self, steps) -> ReadAhead | None:
        """Two phases: each rank reads every bucket it owns into that bucket's own buffer, in a thread, all ranks at
        once (each its own bytes), while the pipeline moves the buckets already read (loader/read_ahead.py)."""
        if not self.two_phase:
            return None
        reads = []
        for i, step in enumerate(s for s in steps if s.owner == self.world.rank):
            if self.feeder is not None:
                reads.append((step, self.exchange.data(self.feeder.buffers[step.seq])))
            else:
                reads.append((step, self.exchange.private_buffer(i)))
        return ReadAhead(reads, self._read_bucket, self._reading_thread_start)

    def _read_bucket(self, step, dest):
        return self.exchange.read(step, self.filler, dest, self.args.verify)

    def _reading_thread_start(self) -> None:
        if self.placement.kind == "cuda":  # the CUDA runtime's current device is per thread
            import torch

            torch.cuda.set_device(self.device)

    def push(self, steps) -> None:
        """The one bucket pipeline: for each step its owner reads the bucket (or has it read ahead), the exchange
        moves it to every receiving rank, and each receiver hands it to its server rank, which loads it (streaming)
        or checks and keeps it (two phases: every bucket has its own buffer, so nothing waits for the server)."""
        t0 = time.perf_counter()
        feeder = self.feeder
        if self.two_phase:
            self.guarded(lambda: feeder.listen() if feeder is not None else None)
            self.guarded(self.stage_call)
        self.guarded(lambda: feeder.hello([s.bucket for s in steps]) if feeder is not None else None)
        # reading begins once every server took the hello: a rank killed while reading leaves its server a
        # connected channel that ends (and removes its socket files) at once
        ahead = self.guarded(lambda: self.read_ahead(steps))
        try:
            self._push(steps, ahead)
        finally:
            if ahead is not None:
                ahead.close()
                self.times.read_s += ahead.read_s
        self.times.total_s = time.perf_counter() - t0

    def _push(self, steps, ahead: ReadAhead | None) -> None:
        args, feeder, times, rank = self.args, self.feeder, self.times, self.world.rank
        move_s = 0.0
        with ServerClient.progress(
            total=sum(s.bucket.payload_bytes for s in steps), disable=args.quiet or not self.leads
        ) as bar:
            if feeder is not None:
                feeder.on_bucket = lambda b: bar.update(b.payload_bytes)
            carried: BaseException | None = None  # a send that failed: agreed on at the next step
            for step in steps:
                error, buffer, digests = carried, None, None
                try:
                    if error is None:
                        if feeder is not None:
                            buffer = self.exchange.data(feeder.free_buffer(step.seq, times))
                        if ahead is not None and step.seq in ahead:
                            buffer, digests = ahead.take(step.seq)
                        elif rank == step.owner:
                            t_read = time.perf_counter()
                            buffer, digests = self.exchange.read(step, self.filler, buffer, args.verify)
                            times.read_s += time.perf_counter() - t_read
                except UPDATE_ERRORS as exc:  # a read that failed (here or ahead): every rank stops at this step
                    error = exc
                self.agree(error)
                if self.exchange.takes_part(step):
                    t_move = time.perf_counter()
                    digests = self.exchange.move(step, buffer, digests, args.verify)
                    move_s += time.perf_counter() - t_move
                carried = None
                if feeder is not None:
                    try:
                        feeder.send_bucket(step.seq, step.bucket, digests, times)
                    except (PushError, OSError, RuntimeError) as exc:
                        carried = exc
            self.agree(carried)
            self.guarded(lambda: feeder.finish(len(steps), times) if feeder is not None else None)
        if self.world.distributed:
            times.extra["exchange between loader ranks"] = move_s

    def push_mapped(self) -> None:
        if self.feeder is None:  # another loader process feeds this node's server ranks
            return
        t0 = time.perf_counter()
        self.feeder.run_mapped(self.files, self.file_buckets, self.times, self.args.verify)
        self.times.total_s = time.perf_counter() - t0
        self.reader.bytes_read = sum(
            b.payload_bytes for _, b in self.file_buckets
        )  # read by the server, from our files

    # ------------------------------------------------------------------ report
    def report(self, wall_s: float) -> None:
        world, times, out = self.world, self.times, sys.stdout
        tag = f"[sglang-ckpt rank {world.rank}]" if world.distributed else "[sglang-ckpt]"
        if self.receives:
            gb = times.bytes / 1e9
            rate = gb / times.total_s if times.total_s else 0.0
            fed = len(self.rank_keys)
            if self.mapped:
                mode = f"page cache: {f'{fed} server ranks' if fed > 1 else 'the server'} mapped the files"
            else:
                mode = "shared bucket buffers" + (f" (one set for {fed} server ranks)" if fed > 1 else "")
                mode += f" {self.feeder.buffer_source}"
            if fed > 1:
                mode += ", each rank copying its slice"
            if self.two_phase:
                mode += "; staged while the server kept serving, then committed"
            print(
                f"{tag} pushed {times.buckets} buckets, {gb:.3f} GB in {times.total_s:.3f} s ({rate:.2f} GB/s) "
                f"via {mode}",
                file=out,
            )
            if self.reader.direct_bytes:
                print(f"{tag} read {self.reader.direct_bytes / 1e9:.3f} GB past the page cache (O_DIRECT)", file=out)
            print(
                f"{tag} stages: read {times.read_s:.3f} s | wait for server {times.wait_s:.3f} s | server load "
                f"{times.load_s:.3f} s | server post-process {times.post_s:.3f} s",
                file=out,
            )
            copied = " | ".join(f"{key} {f.written_bytes}" for key, f in zip(self.rank_keys, self.feeder.feeders))
            print(
                f"{tag} bytes each server rank copied into its weights (its slice, in its dtype): {copied} "
                f"(of {times.bytes} pushed)",
                file=out,
            )
        print(f"{tag} around the push: " + " | ".join(f"{k} {v:.3f} s" for k, v in times.extra.items()), file=out)
        read = self.control.all_gather_int(self.reader.bytes_read)
        moved = sum(self.control.all_gather_int(self.exchange.bytes_received if self.exchange is not None else 0))
        if world.rank == 0:
            print(f"[sglang-ckpt] between loader processes: {moved} bytes", file=out)
            total = sum(read) or 1
            per_rank = " | ".join(f"rank {r}: {b} ({100 * b / total:.1f}%)" for r, b in enumerate(read))
            print(f"[sglang-ckpt] bytes read from disk per rank: {per_rank}", file=out)
        if self.leads:
            message = self.commit_message if self.two_phase else self.http.message
            print(
                f"{tag} server {self.args.endpoint}: {message} (weight_version={self.args.weight_version}); "
                f"wall {wall_s:.3f} s including planning and waiting for the server",
                file=out,
            )
        if self.feeder is not None and self.feeder.fingerprint and world.rank == self.receivers[0]:
            print(
                f"[sglang-ckpt] checkpoint fingerprint={self.feeder.fingerprint} (the server reports it in /model_info)"
            )
