"""A real loader (RankFeeder / NodeFeeder / BucketFiller) and a real ReceiveSession in one process, over a real
channel: the receiver's whole path without a server (test_transport.py, the family matrix)."""

from __future__ import annotations

import threading

import torch

from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
from sglang_ckpt_plugin.loader.filler import BucketFiller
from sglang_ckpt_plugin.loader.node_feed import NodeFeeder
from sglang_ckpt_plugin.loader.plan import plan_buckets, plan_file_buckets
from sglang_ckpt_plugin.loader.push import RankFeeder, StageTimes, new_update_id
from sglang_ckpt_plugin.loader.reader import CheckpointReader
from sglang_ckpt_plugin.server.receiver import ReceiveSession
from sglang_ckpt_plugin.transport.channel import make_endpoint

CPU = torch.device("cpu")


def whole_params(manifest, partial, allow_unused):
    """A stand-in for the model dry run: every tensor writes the parameter of its name, whole."""
    from sglang_ckpt_plugin.server.receiver import _nbytes
    from sglang_ckpt_plugin.server.validate import CheckedUpdate

    return CheckedUpdate({name: ((0, _nbytes(dtype, shape)),) for name, dtype, shape in manifest})


def run_session(
    ckpt_dir,
    model,
    bucket_size=80_000,
    loader_hook=None,
    idle_timeout_s=10.0,
    post=lambda: None,
    verify=False,
    mapped=False,
    hello_timeout_s=10.0,
    session_out=None,
    checksum="xxh3",
    validate=None,
    prepare=lambda: None,
    load_weights=None,
    kept=None,
):
    """One update of ``model`` from ``ckpt_dir``: (stats, loader errors, buckets). ``validate``: the receiver's
    check (default: every tensor writes the parameter of its name, whole); ``load_weights``: what each bucket is
    handed to (default: the model's own)."""
    tensors = read_checkpoint(ckpt_dir)
    buckets = plan_buckets(tensors, bucket_size)
    files, file_buckets = plan_file_buckets(tensors, bucket_size)
    update_id = new_update_id("test")
    endpoint = make_endpoint(update_id, "cpu-tp0")
    cancelled = threading.Event()
    feeder = RankFeeder(endpoint, update_id, 10.0, cancelled, checksum=checksum if verify else "none")
    node = NodeFeeder([feeder])
    if not mapped:  # kept: the rank's KeptBuffers, which the loader asks to borrow
        node.allocate(max(b.nbytes for b in buckets), 2, CPU, borrow=kept is not None)
    reader = CheckpointReader()
    errors = []

    def loader():
        try:
            (loader_hook or (lambda f: None))(feeder)
            if mapped:
                node.run_mapped(files, file_buckets, StageTimes(), verify)
            else:
                filler = BucketFiller(reader, CPU, 0, checksum=checksum)
                node.run(buckets, lambda bucket, owned: filler.fill(bucket, owned.view, digests=verify), StageTimes())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
        finally:
            node.close()

    t = threading.Thread(target=loader)
    t.start()
    served = False
    try:
        session = ReceiveSession(
            endpoint,
            CPU,
            load_weights or model.load_weights,
            post,
            idle_timeout_s,
            validate or whole_params,
            prepare=prepare,
            hello_timeout_s=hello_timeout_s,
            kept=kept,
        )
        if session_out is not None:
            session_out.append(session)
        stats = session.run()
        served = True
    finally:
        # the loader reads the session's last reply and returns: its answer, or the error a failed session sent before
        # it raised (cancelling at once raced with reading that error: the loader then heard nothing, 1 run in ~50)
        t.join(timeout=30 if served else 3)
        cancelled.set()  # a loader still waiting for a session that failed without a word stops now
        t.join()
        reader.close()
    run_session.last_fingerprint = feeder.fingerprint
    run_session.buffer_source = node.buffer_source
    return stats, errors, len(file_buckets if mapped else buckets)
