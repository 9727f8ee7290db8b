"""One update, end to end, for one loader rank: plan, wait for the server, push, report."""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

from ..transport.channel import make_endpoint
from ..transport.handles import device_rank_key
from .checkpoint import CheckpointError, read_checkpoint
from .http import ServerClient, ServerError
from .metas import load_metas, save_metas
from .plan import align_up, auto_bucket_size, plan_buckets
from .push import PushError, RankFeeder, StageTimes, new_update_id
from .reader import BucketFiller, CheckpointReader


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def report(times: StageTimes, bytes_read: int, out=sys.stdout) -> None:
    gb = times.bytes / 1e9
    rate = gb / times.total_s if times.total_s else 0.0
    print(f"[sglang-ckpt] pushed {times.buckets} buckets, {gb:.3f} GB in {times.total_s:.3f} s ({rate:.2f} GB/s)", file=out)
    print(
        f"[sglang-ckpt] stages: read {times.read_s:.3f} s | wait for server {times.wait_s:.3f} s | "
        f"server load {times.load_s:.3f} s | server post-process {times.post_s:.3f} s | "
        f"bytes read by this rank {bytes_read}",
        file=out,
    )
    if times.extra:
        print("[sglang-ckpt] around the push: " + " | ".join(f"{k} {v:.3f} s" for k, v in times.extra.items()), file=out)


def run_update(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CheckpointError, ServerError, PushError, ValueError, OSError) as exc:
        print(f"[sglang-ckpt] error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    if args.load_metas_file:
        _, shards = load_metas(args.load_metas_file)
        tensors = [t for shard in shards for t in shard]
    else:
        tensors = read_checkpoint(args.checkpoint_path)
    if args.save_metas_file:
        save_metas(args.save_metas_file, args.checkpoint_name, [tensors])
    bucket_size = align_up(args.bucket_size) if args.bucket_size else auto_bucket_size(tensors)
    buckets = plan_buckets(tensors, bucket_size)
    bucket_bytes = max(b.nbytes for b in buckets)

    t_plan = time.perf_counter()
    client = ServerClient(args.endpoint, uds=args.uds, timeout_s=args.timeout, api_key=args.api_key)
    server_tp = client.wait_until_listening()["ckpt_plugin"].get("tp_size")
    if server_tp is not None and server_tp != args.inference_parallel_size:
        raise ValueError(f"the server runs with tp={server_tp} but --inference-parallel-size is "
                         f"{args.inference_parallel_size}; pass --inference-parallel-size {server_tp}")  # fmt: skip
    t_listening = time.perf_counter()

    update_id = new_update_id(args.checkpoint_name)
    rank_key = device_rank_key(device, tp_rank=0)
    endpoint = make_endpoint(update_id, rank_key)
    times = StageTimes()
    cancelled = threading.Event()
    reader = CheckpointReader()
    feeder = RankFeeder(endpoint, update_id, args.timeout, cancelled, verify=args.verify, partial=args.partial,
                         allow_unused=args.allow_unused)
    # The server needs a few tens of ms to reach its receiver: allocate the buffers meanwhile.
    http = client.start_update({rank_key: endpoint}, args.weight_version, not args.no_flush_cache, cancelled)
    try:
        feeder.allocate(bucket_bytes, min(args.num_buffers, len(buckets)), device)
        t_buffers = time.perf_counter()
        filler = BucketFiller(reader, device, bucket_bytes)
        t0 = time.perf_counter()
        with client.progress(total=sum(b.payload_bytes for b in buckets), disable=args.quiet) as bar:
            feeder.on_bucket = lambda b: bar.update(b.payload_bytes)
            feeder.run(buckets, filler, times)
        times.total_s = time.perf_counter() - t0
    except BaseException as exc:
        feeder.abort(str(exc))
        cancelled.set()
        http.join_quietly()
        raise (http.error if isinstance(exc, PushError) and http.error else exc)
    finally:
        feeder.close()
        reader.close()
    t_pushed = time.perf_counter()
    http.join()  # raises ServerError if the server reported failure
    times.extra = {"plan": t_plan - t_start, "server check": t_listening - t_plan,
                   "buffers": t_buffers - t_listening, "server finalize": time.perf_counter() - t_pushed}  # fmt: skip
    report(times, reader.bytes_read)
    print(f"[sglang-ckpt] server: {http.message} (weight_version={args.weight_version}); "
          f"wall {time.perf_counter() - t_start:.3f} s including planning and waiting for the server")  # fmt: skip
    if feeder.fingerprint:
        print(f"[sglang-ckpt] checkpoint fingerprint={feeder.fingerprint} (the server reports it in /model_info)")
    if args.sleep_time:
        time.sleep(args.sleep_time)
    return 0
