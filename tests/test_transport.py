"""Transport tests without SGLang: shared-memory handles, the channel, and a whole loader<->rank session
between two threads, loading into a real torch module."""

import os
import threading
import time

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from sglang_ckpt_plugin.loader.node_feed import NodeFeeder
from sglang_ckpt_plugin.loader.push import PushError, RankFeeder, StageTimes
from sglang_ckpt_plugin.server.receiver import UpdateFailed
from sglang_ckpt_plugin.transport.channel import Channel, check_endpoint, make_endpoint, socket_dir
from sglang_ckpt_plugin.transport.handles import ShmBuffer, open_buffer
from sglang_ckpt_plugin.transport.messages import ProtocolError, ShmHandle

from .conftest import our_leftovers
from .inproc_session import run_session

CPU = torch.device("cpu")


def test_shm_is_private_zero_copy_and_unlinkable():
    buf = ShmBuffer(1 << 16)
    try:
        assert os.stat(buf.path).st_mode & 0o777 == 0o600
        mapped = open_buffer(buf.handle(), CPU)
        buf.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert mapped.tensor[:4].tolist() == [1, 2, 3, 4]  # same memory, no copy
        buf.unlink()
        assert not os.path.exists(buf.path)
        buf.tensor[4] = 9
        assert mapped.tensor[4].item() == 9  # mappings outlive the name
        mapped.close()
    finally:
        buf.release()


@pytest.mark.parametrize("name", ["../../etc/passwd", "other-segment", "sglang-ckpt-x/y"])
def test_receiver_refuses_foreign_shm_names(name):
    with pytest.raises(ValueError, match="not one of ours"):
        open_buffer(ShmHandle(name=name, nbytes=10), CPU)


def test_receiver_refuses_shm_readable_by_others():
    buf = ShmBuffer(4096)
    try:
        os.chmod(buf.path, 0o644)
        with pytest.raises(PermissionError, match="0600"):
            open_buffer(buf.handle(), CPU)
    finally:
        buf.release()


def test_endpoints_must_be_live_sockets_of_ours_in_the_private_dir(tmp_path):
    assert os.stat(socket_dir()).st_mode & 0o777 == 0o700
    ep = make_endpoint("u1", "cpu-tp0")
    with pytest.raises(ProtocolError, match="no such socket"):
        check_endpoint(ep)  # a name that passes the pattern but is not bound fails at once, not at a timeout
    with Channel(ep, bind=True):
        assert check_endpoint(ep) == ep
    for bad in ["tcp://1.2.3.4:5", "ipc:///tmp/x.sock", ep.replace("u1-", "../u1-"), ep + ".x"]:
        with pytest.raises(ProtocolError):
            check_endpoint(bad)
    plain = make_endpoint("plainfile", "cpu-tp0")
    open(plain.removeprefix("ipc://"), "w").close()
    link = make_endpoint("link", "cpu-tp0")
    with Channel(ep, bind=True):
        os.symlink(ep.removeprefix("ipc://"), link.removeprefix("ipc://"))
        try:
            for not_a_socket in (plain, link):
                with pytest.raises(ProtocolError, match="not a socket"):
                    check_endpoint(not_a_socket)
        finally:
            os.unlink(plain.removeprefix("ipc://"))
            os.unlink(link.removeprefix("ipc://"))


@pytest.mark.parametrize("problem", ["mode 0755", "another owner", "a symlink"])
def test_socket_dir_that_others_could_enter_is_refused(tmp_path, monkeypatch, problem):
    target = tmp_path / "socks"
    target.mkdir(mode=0o700)
    if problem == "mode 0755":
        os.chmod(target, 0o755)
    elif problem == "another owner":
        if os.getuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(target, 12345, 12345)
    else:
        os.symlink(target, tmp_path / "link")
        target = tmp_path / "link"
    monkeypatch.setenv("SGLANG_CKPT_SOCKET_DIR", str(target))
    with pytest.raises(PermissionError, match="mode 0700"):
        socket_dir()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.zeros(300, 64))
        self.proj = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))
        self.norm = torch.nn.Parameter(torch.zeros(64))

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, w in weights:
            params[name].data.copy_(w)


@pytest.fixture
def checkpoint(tmp_path):
    state = {"emb": torch.randn(300, 64), "proj": torch.randn(64, 64).bfloat16(), "norm": torch.rand(64)}
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path, state


def test_full_session_loads_every_tensor_in_several_buckets(checkpoint):
    ckpt_dir, state = checkpoint
    model = Tiny()
    before = set(our_leftovers())
    stats, errors, n = run_session(ckpt_dir, model)
    assert errors == [] and n >= 2 and stats.buckets == n and stats.tensors == 3
    for name, value in state.items():
        assert torch.equal(dict(model.named_parameters())[name].data, value)
    assert set(our_leftovers()) - before == set()


def test_load_error_fails_both_sides_and_leaks_nothing(checkpoint):
    ckpt_dir, _ = checkpoint

    class Broken(Tiny):
        def load_weights(self, weights):
            raise KeyError("no such parameter: emb")

    before, loader = set(our_leftovers()), _LoaderErrors()
    with pytest.raises(UpdateFailed, match="no such parameter"):
        run_session(ckpt_dir, Broken(), loader_hook=loader.watch)
    assert set(our_leftovers()) - before == set()
    # the loader heard the rank's reason, not a timeout or a disconnect
    assert len(loader.errors) == 1 and "no such parameter: emb" in loader.errors[0], loader.errors


@pytest.mark.parametrize("failure", ["load_weights raises", "checksum mismatch", "refused manifest"])
def test_failed_updates_unmap_every_buffer(checkpoint, failure):
    """A failed bucket must not keep the loader's buffer mapped: the exception's traceback held the frames of
    ``load_weights`` and ``_verify``, and with them the bucket's views, so the release that runs while it
    propagates found views alive and parked the mapping for good (on a GPU: an IPC mapping never closed, the
    trainer's buffer of a LocalPush never freed). Twenty failed updates leave nothing mapped."""
    from sglang_ckpt_plugin.server import receiver

    ckpt_dir, _ = checkpoint

    class Broken(Tiny):
        def load_weights(self, weights):
            held = list(weights)  # as a model's loader holds its arguments when it raises
            raise KeyError(f"no such parameter: {held[0][0]}")

    def corrupt(feeder):
        real = feeder.send_bucket
        feeder.send_bucket = lambda seq, bucket, digests, times, **kw: real(
            seq, bucket, [d ^ 1 for d in digests], times, **kw
        )

    def refuse(manifest, partial, allow_unused):
        raise ValueError("no parameter named emb")

    kept_before, sessions = len(receiver._KEPT_ALIVE), []
    for _ in range(20):
        with pytest.raises(UpdateFailed, match="no such parameter|checksum mismatch|no parameter named"):
            if failure == "load_weights raises":
                run_session(ckpt_dir, Broken(), session_out=sessions)
            elif failure == "checksum mismatch":
                run_session(ckpt_dir, Tiny(), loader_hook=corrupt, verify=True, session_out=sessions)
            else:
                run_session(ckpt_dir, Tiny(), validate=refuse, session_out=sessions)
    assert len(receiver._KEPT_ALIVE) == kept_before, "failed updates left loader buffers mapped"
    assert all(s.buffers == [] and s.fds == [] for s in sessions)


class _LoaderErrors:
    """A loader hook that records the errors the rank's answers carried to the loader: in the reply it waited for,
    or, where the rank had ended before the loader's next send, in the last words it read then."""

    def __init__(self):
        self.errors = []

    def watch(self, feeder):
        for name in ("_wait_reply", "send_bucket"):
            setattr(feeder, name, self._recording(getattr(feeder, name)))

    def _recording(self, real):
        def call(*args, **kwargs):
            try:
                return real(*args, **kwargs)
            except PushError as exc:
                self.errors.append(str(exc))
                raise

        return call


def test_post_processing_error_is_a_failed_update(checkpoint):
    ckpt_dir, _ = checkpoint

    def post():
        raise RuntimeError("repack failed")

    with pytest.raises(UpdateFailed, match="repack failed"):
        run_session(ckpt_dir, Tiny(), post=post)


def test_quiet_loader_is_noticed(checkpoint):
    ckpt_dir, _ = checkpoint
    stall = threading.Event()

    def hook(feeder):
        stall.wait(3)  # never says hello in time

    with pytest.raises(UpdateFailed, match="went quiet: no hello within 0.5 s"):
        run_session(ckpt_dir, Tiny(), loader_hook=hook, hello_timeout_s=0.5)
    stall.set()


def test_channel_round_trip_and_timeout(tmp_path):
    ep = make_endpoint("chan", "t")
    with Channel(ep, bind=True) as a, Channel(ep, bind=False) as b:
        from sglang_ckpt_plugin.transport.messages import Finish

        a.send(Finish(seq=3))
        assert b.recv(5) == Finish(seq=3)
        with pytest.raises(TimeoutError):
            b.recv(0.05)
    assert not os.path.exists(ep.removeprefix("ipc://"))


def test_the_last_answer_before_a_close_always_arrives_and_then_the_disconnect():
    """A server rank answers the finish (or says why it failed) and closes at once. The answer must reach the
    loader, not a "the server's rank disconnected" (CI failed on that: libzmq dropped the queued reply at a close
    without linger, or its monitor reported the disconnect before the socket showed the reply; it lost a fifth
    to a quarter of 300 tries here). After the answer, the next receive reports the disconnect at once."""
    from sglang_ckpt_plugin.transport.channel import PeerGone
    from sglang_ckpt_plugin.transport.messages import Reply

    lost = 0
    for i in range(200):
        ep = make_endpoint(f"last{i}", "t")
        with Channel(ep, bind=True) as loader:

            def answer_and_close(ep=ep, i=i):
                with Channel(ep, bind=False) as server:
                    server.send(Reply(seq=4, ok=False, error="e" * (i * 20)), timeout_s=5)

            server = threading.Thread(target=answer_and_close)
            server.start()
            try:
                assert loader.recv(5) == Reply(seq=4, ok=False, error="e" * (i * 20))
            except PeerGone:
                lost += 1
            server.join()
            if i == 0:
                t0 = time.monotonic()
                with pytest.raises(PeerGone):
                    loader.recv(5)
                assert time.monotonic() - t0 < 2
    assert lost == 0, f"{lost} of 200 answers sent just before a close were lost"


def test_send_after_the_peer_left_never_blocks():
    """The server can close its side (it rejected the update) between the loader's poll saying "writable"
    and its send; a blocking send on a PAIR without a peer then waits forever (a loader hung in ``abort``,
    seen in CI). Here poll always says writable, as in that window: the send must end at its timeout."""
    from sglang_ckpt_plugin.transport.messages import Abort, Finish

    class PollSaysWritable:
        def __init__(self, sock):
            self._sock = sock

        def poll(self, timeout_ms, flags):
            return flags

        def __getattr__(self, name):
            return getattr(self._sock, name)

    ep = make_endpoint("gone", "t")
    with Channel(ep, bind=True) as loader:
        server = Channel(ep, bind=False)
        server.send(Finish(seq=1))
        assert loader.recv(5) == Finish(seq=1)
        server.close()
        time.sleep(0.2)  # the disconnect reaches the loader's socket
        real, loader._sock = loader._sock, PollSaysWritable(loader._sock)
        outcome = []
        sender = threading.Thread(
            target=lambda: outcome.append(_send_or_timeout(loader, Abort(reason="x"))), daemon=True
        )
        sender.start()
        sender.join(5)
        loader._sock = real
        assert outcome == ["timeout"], "send blocked on a PAIR whose peer left"


def _send_or_timeout(channel, msg) -> str:
    try:
        channel.send(msg, timeout_s=0.3)
        return "sent"
    except TimeoutError:
        return "timeout"


def test_feeder_reports_server_refusal():
    cancelled = threading.Event()
    cancelled.set()
    ep = make_endpoint("refused", "cpu-tp0")
    node = NodeFeeder([RankFeeder(ep, "refused", 5.0, cancelled)])
    node.allocate(4096, 2, CPU)
    try:
        with pytest.raises(PushError, match="cancelled"):
            node.run([], None, StageTimes())
    finally:
        node.close()


def test_loader_that_dies_mid_update_is_noticed_at_once(checkpoint):
    """The loader closes its socket after the first bucket: the rank fails fast, not at its idle timeout."""
    import time

    ckpt_dir, _ = checkpoint

    class SlowFirstBucket(Tiny):
        def load_weights(self, weights):
            super().load_weights(weights)
            time.sleep(0.3)  # the loader is gone by the time we ask for the next message

    def hook(feeder):
        real_send = feeder.channel.send

        def send_then_vanish(msg, timeout_s=30.0):
            real_send(msg, timeout_s)
            if type(msg).__name__ == "BucketReady":
                feeder.channel.close()
                raise RuntimeError("loader killed")

        feeder.channel.send = send_then_vanish

    t0 = time.monotonic()
    with pytest.raises(UpdateFailed, match="disconnected"):
        run_session(ckpt_dir, SlowFirstBucket(), loader_hook=hook, idle_timeout_s=30.0)
    assert time.monotonic() - t0 < 10


def disk_fingerprint(ckpt_dir):
    """Computed independently of the loader: safetensors' own reader, then the documented formula."""
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.transport.integrity import fingerprint, tensor_digest

    entries = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        for name, t in load_file(f).items():
            flat = t.contiguous().reshape(-1).view(torch.uint8)
            entries[name] = (str(t.dtype).removeprefix("torch."), list(t.shape), tensor_digest(flat))
    return fingerprint(entries)


def test_verified_session_reports_the_checkpoint_fingerprint(checkpoint):
    ckpt_dir, _ = checkpoint
    stats, errors, _ = run_session(ckpt_dir, Tiny(), verify=True)
    assert errors == []
    assert stats.fingerprint == run_session.last_fingerprint == disk_fingerprint(ckpt_dir)


def test_corrupted_bytes_are_caught_before_anything_is_written(checkpoint):
    ckpt_dir, _ = checkpoint
    model = Tiny()

    def corrupt(feeder):
        real = feeder.send_bucket
        feeder.send_bucket = lambda seq, bucket, digests, times, **kw: real(
            seq, bucket, [d ^ 1 for d in digests], times, **kw
        )

    with pytest.raises(UpdateFailed, match="checksum mismatch"):
        run_session(ckpt_dir, model, loader_hook=corrupt, verify=True)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters()), "a corrupted bucket reached the model"


def test_word_sum_checksum_is_checked_in_place_and_catches_corruption(checkpoint, monkeypatch):
    """The GPU path's checksum (--verify into GPU buffers), run on CPU buffers: the receiver computes it on the
    tensor where it lies (no host copy of it), matches the loader's streaming sums, and catches a changed byte."""
    from sglang_ckpt_plugin.server import receiver
    from sglang_ckpt_plugin.transport.word_sums import host_digest

    ckpt_dir, state = checkpoint
    copied = []
    monkeypatch.setattr(receiver, "tensor_digest", lambda flat: copied.append(flat) or 0)
    model = Tiny()
    stats, errors, _ = run_session(ckpt_dir, model, verify=True, checksum="wordsum")
    assert errors == [] and copied == []
    for name, value in state.items():
        assert torch.equal(dict(model.named_parameters())[name].data, value)
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.transport.integrity import fingerprint

    entries = {
        name: (
            str(t.dtype).removeprefix("torch."),
            list(t.shape),
            host_digest(t.contiguous().reshape(-1).view(torch.uint8).numpy()),
        )
        for f in ckpt_dir.glob("*.safetensors")
        for name, t in load_file(f).items()
    }
    assert stats.fingerprint == run_session.last_fingerprint == fingerprint(entries)

    def corrupt(feeder):
        real = feeder.send_bucket
        feeder.send_bucket = lambda seq, bucket, digests, times, **kw: real(
            seq, bucket, [d ^ 1 for d in digests], times, **kw
        )

    fresh = Tiny()
    with pytest.raises(UpdateFailed, match="checksum mismatch"):
        run_session(ckpt_dir, fresh, loader_hook=corrupt, verify=True, checksum="wordsum")
    assert all(torch.count_nonzero(p) == 0 for p in fresh.parameters())


def test_page_cache_session_maps_one_bucket_range_at_a_time(checkpoint, monkeypatch):
    from sglang_ckpt_plugin.server import receiver

    ckpt_dir, state = checkpoint
    ranges = []
    real = receiver.open_file_range
    monkeypatch.setattr(receiver, "open_file_range", lambda fd, h, a, b: ranges.append(b - a) or real(fd, h, a, b))
    model = Tiny()
    stats, errors, n = run_session(ckpt_dir, model, mapped=True, verify=True)
    assert errors == [] and n >= 2 and stats.tensors == 3
    for name, value in state.items():
        assert torch.equal(dict(model.named_parameters())[name].data, value)
    assert max(ranges) <= 80_000  # never more than one bucket's bytes mapped
    assert stats.fingerprint == run_session.last_fingerprint == disk_fingerprint(ckpt_dir)


# ---------------------------------------------------------------- the manifest is the contract
def _tamper(feeder_method, edit):
    """A loader hook that rewrites the bucket messages it sends."""

    def hook(feeder):
        real = feeder.channel.send

        def send(msg, timeout_s=30.0):
            from sglang_ckpt_plugin.transport.messages import BucketReady

            if isinstance(msg, BucketReady):
                msg = edit(msg)
            return real(msg, timeout_s)

        feeder.channel.send = send

    return hook


@pytest.mark.parametrize(
    "case,edit,match",
    [
        (
            "outside",
            lambda m: msgspec.structs.replace(m, tensors=[msgspec.structs.replace(m.tensors[0], name="other")]),
            "not in the update's manifest",
        ),
        (
            "shape",
            lambda m: msgspec.structs.replace(m, tensors=[msgspec.structs.replace(m.tensors[0], shape=[1])]),
            "the manifest says",
        ),
        ("twice", lambda m: msgspec.structs.replace(m, tensors=m.tensors + m.tensors[:1]), "already sent"),
        (
            "outside the buffer",
            lambda m: msgspec.structs.replace(m, tensors=[msgspec.structs.replace(m.tensors[0], offset=10**9)]),
            "outside its buffer",
        ),
    ],
)
def test_bucket_outside_the_manifest_is_refused_before_it_is_loaded(checkpoint, case, edit, match):
    ckpt_dir, _ = checkpoint
    model = Tiny()
    sessions = []
    with pytest.raises(UpdateFailed, match=match):
        run_session(ckpt_dir, model, loader_hook=_tamper("send", edit), session_out=sessions)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters()), "a refused bucket reached the model"
    assert sessions[0].touched_weights is False


def test_loader_that_finishes_before_sending_the_manifest_fails_the_update(checkpoint):
    ckpt_dir, _ = checkpoint

    def hook(feeder):
        real = feeder.send_bucket
        feeder.send_bucket = lambda seq, bucket, *a, **k: None if seq > 0 else real(seq, bucket, *a, **k)

    with pytest.raises(UpdateFailed, match="finished after"):
        run_session(ckpt_dir, Tiny(), loader_hook=hook)


def test_model_that_keeps_a_view_fails_the_update_instead_of_aliasing_the_loader(checkpoint):
    from sglang_ckpt_plugin.server import receiver

    ckpt_dir, state = checkpoint

    class Keeps(Tiny):
        kept = []

        def load_weights(self, weights):
            weights = list(weights)
            Keeps.kept.extend(weights)  # a loader that keeps the tensor it was given
            super().load_weights(weights)

    parked = len(receiver._KEPT_ALIVE)
    with pytest.raises(UpdateFailed, match="kept a reference"):
        run_session(ckpt_dir, Keeps())
    # its mapping stays (never unmapped under a live view) and the kept tensor still reads the bytes it was given
    assert len(receiver._KEPT_ALIVE) == parked + 1
    name, kept = Keeps.kept[0]
    assert torch.equal(kept, state[name])
    Keeps.kept.clear()


# ---------------------------------------------------------------- descriptors are bound to the connected peer
def test_reusable_buffers_travel_as_descriptors_and_map_read_only(checkpoint):
    from sglang_ckpt_plugin.transport.fdpass import FdOffer, receive_fds
    from sglang_ckpt_plugin.transport.messages import ShmFdHandle

    buf = ShmBuffer(1 << 16, reusable=True)
    path = str(socket_dir() / "fdtest.fds")
    offer = FdOffer(path, [buf.fd], timeout_s=5)
    try:
        handle = buf.handle(slot=0)
        assert handle == ShmFdHandle(slot=0, nbytes=1 << 16)  # no pid or fd on the wire
        (fd,) = receive_fds(path, 1, timeout_s=5)
        mapped = open_buffer(handle, CPU, fd)
        os.close(fd)
        buf.tensor[:3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
        assert mapped.tensor[:3].tolist() == [7, 8, 9]  # zero copy
        with pytest.raises(TypeError, match="readonly"):
            mapped._mapping[0] = 1  # the rank cannot write into the loader's buffer
        mapped.close()
    finally:
        offer.close()
        buf.release()
    assert not os.path.exists(path)


def test_receive_fds_refuses_what_is_not_a_socket_of_ours(tmp_path):
    from sglang_ckpt_plugin.transport.fdpass import receive_fds

    plain = tmp_path / "x.fds"
    plain.write_text("")
    with pytest.raises(ValueError, match="not a socket"):
        receive_fds(str(plain), 1, timeout_s=1)
    with pytest.raises(ValueError, match="announced 0"):
        receive_fds(str(plain), 0, timeout_s=1)


# ---------------------------------------------------------------- bounds of bucket views
def test_bucket_views_bounds():
    from sglang_ckpt_plugin.server.receiver import bucket_views
    from sglang_ckpt_plugin.transport.handles import MappedBuffer
    from sglang_ckpt_plugin.transport.messages import BucketReady, TensorSlot

    buffers = [MappedBuffer(torch.zeros(64, dtype=torch.uint8)), None]
    ok = BucketReady(seq=0, buffer=0, tensors=[TensorSlot("a", "float32", [4], 16)])
    ((name, view),) = bucket_views(ok, buffers)
    assert name == "a" and view.dtype == torch.float32 and view.data_ptr() == buffers[0].tensor.data_ptr() + 16
    cases = [
        (BucketReady(seq=0, buffer=2, tensors=[]), "only 2 mapped"),
        (BucketReady(seq=0, buffer=1, tensors=[TensorSlot("a", "int8", [1], 0)]), "not mapped"),
        (BucketReady(seq=0, buffer=0, tensors=[TensorSlot("a", "float32", [4], 56)]), "outside its buffer"),
        (BucketReady(seq=0, buffer=0, tensors=[TensorSlot("a", "float32", [2], 6)]), "not aligned"),
        (BucketReady(seq=0, buffer=0, tensors=[TensorSlot("a", "int8", [2**40], 0)]), "outside its buffer"),
    ]
    for msg, match in cases:
        with pytest.raises(ProtocolError, match=match):
            bucket_views(msg, buffers)


def test_cuda_ipc_handle_is_refused_by_a_cpu_rank():
    from sglang_ckpt_plugin.transport.messages import CudaIpcHandle

    cuda = CudaIpcHandle(
        nbytes=8,
        device_uuid="GPU-x",
        handle=b"h",
        storage_size_bytes=8,
        storage_offset_bytes=0,
        ref_counter_handle=b"r",
        ref_counter_offset=0,
        event_handle=b"e",
        event_sync_required=False,
    )
    with pytest.raises(ValueError, match="CUDA IPC buffer was sent to a CPU rank"):
        open_buffer(cuda, CPU)


def test_cuda_rank_refuses_another_gpus_buffer_and_maps_shared_memory(monkeypatch):
    """A CUDA IPC handle from another GPU is refused by UUID before CUDA is touched; shared memory is the
    fallback every rank maps (a CUDA rank's load_weights copies it to the GPU)."""
    from sglang_ckpt_plugin.transport import handles
    from sglang_ckpt_plugin.transport.messages import CudaIpcHandle

    monkeypatch.setattr(handles, "device_rank_key", lambda device, tp_rank: "GPU-mine")
    theirs = CudaIpcHandle(
        nbytes=8,
        device_uuid="GPU-theirs",
        handle=b"h",
        storage_size_bytes=8,
        storage_offset_bytes=0,
        ref_counter_handle=b"r",
        ref_counter_offset=0,
        event_handle=b"e",
        event_sync_required=False,
    )
    with pytest.raises(ValueError, match="on GPU-theirs was sent to the rank on GPU-mine"):
        open_buffer(theirs, torch.device("cuda", 0))
    shm = ShmBuffer(4096)
    try:
        shm.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        mapped = open_buffer(shm.handle(), torch.device("cuda", 0))
        assert mapped.tensor.device.type == "cpu" and mapped.tensor[:4].tolist() == [1, 2, 3, 4]
        mapped.close()
    finally:
        shm.release()


def test_handles_without_descriptor_or_outside_the_file_are_refused(tmp_path):
    from sglang_ckpt_plugin.transport.handles import open_file_range
    from sglang_ckpt_plugin.transport.messages import FileHandle, ShmFdHandle

    with pytest.raises(ValueError, match="no descriptor was handed over"):
        open_buffer(ShmFdHandle(slot=0, nbytes=8), CPU)
    with pytest.raises(ValueError, match="one byte range at a time"):
        open_buffer(FileHandle(slot=0, nbytes=8), CPU)
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="refusing file range"):
            open_file_range(fd, FileHandle(slot=0, nbytes=100), 50, 101)
        with pytest.raises(ValueError, match="not a regular file of 200 bytes"):
            open_file_range(fd, FileHandle(slot=0, nbytes=200), 0, 10)  # the loader announced more than there is
        mapped = open_file_range(fd, FileHandle(slot=0, nbytes=100), 10, 20)
        assert mapped.base == 0 and mapped.tensor.numel() == 20
        mapped.close()
    finally:
        os.close(fd)
    buf = ShmBuffer(4096, reusable=True)
    try:
        os.fchmod(buf.fd, 0o644)  # readable by others: not ours to trust
        with pytest.raises(PermissionError, match="0600"):
            open_buffer(buf.handle(slot=0), CPU, buf.fd)
    finally:
        buf.release()


def test_a_buffer_released_while_a_view_of_it_is_alive_still_lets_go_of_its_descriptor():
    """An update interrupted in the middle of a fill (SIGTERM, a read error) unwinds with a slice of the buffer
    still referenced by the traceback: releasing the buffer must not raise on top of the real error."""
    import os

    from sglang_ckpt_plugin.transport.handles import allocate_buffer

    buf = allocate_buffer(1 << 20, "cpu", reusable=True)
    fd = buf.fd
    held = buf.view[100:200]  # what the interrupted frame holds
    buf.release()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    del held
