"""Unit tests (CPU) for the logic of the CUDA paths: allocator settings kept whole, the IPC reference of a buffer no
server ever mapped released, CUDA IPC handles refused for a staged update, the trainer's current device left alone."""

import threading

import pytest
import torch
from safetensors.torch import save_file

from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
from sglang_ckpt_plugin.loader.plan import plan_buckets
from sglang_ckpt_plugin.loader.push import PushError, RankFeeder, new_update_id
from sglang_ckpt_plugin.placement import ServerPlacement
from sglang_ckpt_plugin.server.receiver import ReceiveSession, UpdateRefused
from sglang_ckpt_plugin.server.validate import CheckedUpdate
from sglang_ckpt_plugin.transport import handles
from sglang_ckpt_plugin.transport.channel import make_endpoint
from sglang_ckpt_plugin.transport.messages import CudaIpcHandle

CONF = (
    "max_split_size_mb:256,roundup_power2_divisions:[256:1,512:2,>:4],expandable_segments:True,"
    "garbage_collection_threshold:0.6"
)


def test_allocator_settings_change_only_expandable_segments():
    assert handles.expandable_segments_enabled(CONF)
    off = handles.with_expandable_segments(CONF, False)
    assert off == (
        "max_split_size_mb:256,roundup_power2_divisions:[256:1,512:2,>:4],"
        "garbage_collection_threshold:0.6,expandable_segments:False"
    )
    assert not handles.expandable_segments_enabled(off)
    assert not handles.expandable_segments_enabled("max_split_size_mb:128")


def test_the_settings_in_force_are_read_at_run_time(monkeypatch):
    monkeypatch.setattr(
        torch._C, "_accelerator_getAllocatorSettings", lambda: "expandable_segments:True", raising=False
    )
    assert handles.expandable_segments_enabled(handles.allocator_settings())  # set by a framework, not the env


def test_a_handle_no_rank_answered_for_gives_back_its_ipc_reference(monkeypatch, tmp_path):
    """Every rank a buffer is handed to gets a handle with a counter of its own; a feeder whose rank never answered
    the hello gives its handles' counters back (else torch keeps the buffer allocated), one whose rank answered
    leaves them to the rank."""
    from sglang_ckpt_plugin.loader import push

    released = []
    monkeypatch.setattr(push, "give_back_ipc_reference", lambda h: released.append(h.ref_counter_offset))
    feeders = [
        RankFeeder(make_endpoint(new_update_id("t"), f"cpu-tp{r}"), "u", 1.0, threading.Event(), listen=False)
        for r in range(2)
    ]
    for offset, feeder in enumerate(feeders):
        buf = FakeCudaBuffer()
        buf.counter = offset
        feeder.adopt([buf])
        feeder._handles()
    feeders[1]._unanswered = {}  # as when its rank answered the hello, having opened the handle
    for feeder in feeders:
        feeder.close()
        feeder.close()  # idempotent
    assert released == [0]


@pytest.mark.parametrize(
    "peer, visible, reachable, problem",
    [
        ("GPU-a", ["GPU-a"], set(), None),  # its own GPU
        ("GPU-b", ["GPU-b", "GPU-a"], {(1, 0)}, None),  # a peer it reads over NVLink / PCIe P2P (local indices)
        ("GPU-b", ["GPU-a", "GPU-b"], {(1, 0)}, "cannot read GPU-b's memory peer to peer"),  # only the other way
        ("GPU-c", ["GPU-a", "GPU-b"], {(0, 1)}, "GPU-c is not visible"),
    ],
)
def test_a_rank_reads_a_buffer_on_another_gpu_only_peer_to_peer(peer, visible, reachable, problem):
    from sglang_ckpt_plugin.placement import peer_unreadable

    said = peer_unreadable("GPU-a", peer, visible, lambda own, other: (own, other) in reachable)
    assert said is None if problem is None else problem in said


def test_a_cuda_ipc_buffer_a_rank_cannot_reach_is_refused_in_words(monkeypatch):
    """The receiver's check before torch opens the handle (which would fail inside the driver, or make a context on
    the peer GPU)."""
    monkeypatch.setattr(handles, "device_rank_key", lambda device, tp_rank: "GPU-a")
    monkeypatch.setattr(handles, "visible_gpu_keys", lambda: ["GPU-a", "GPU-b"])
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda own, peer: False)
    opened = []
    monkeypatch.setattr(handles, "_open_cuda", lambda handle, device: opened.append(handle.device_uuid))
    on_peer = CudaIpcHandle(64, "GPU-b", b"h", 64, 0, b"r", 0, b"e", False)
    with pytest.raises(ValueError, match="cannot read it: GPU-a cannot read GPU-b's memory peer to peer"):
        handles.open_buffer(on_peer, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda own, peer: (own, peer) == (0, 1))
    handles.open_buffer(on_peer, torch.device("cuda", 0))
    assert opened == ["GPU-b"]


class FakeCudaBuffer:
    """What a loader rank holds for a CUDA IPC buffer, as the server sees it on the wire."""

    fd, nbytes, counter = None, 1 << 16, 0

    def handle(self, slot: int = -1) -> CudaIpcHandle:
        return CudaIpcHandle(self.nbytes, "GPU-x", b"h", self.nbytes, 0, b"r", self.counter, b"e", True)

    def unlink(self) -> None:
        pass

    def release(self) -> None:
        pass


def _hello_against(session, feeder, buckets) -> list[str]:
    """The feeder's hello against ``session`` (run here); the loader's errors."""
    errors = []

    def loader():
        try:
            feeder.hello(buckets)
        except PushError as exc:
            errors.append(str(exc))
        finally:
            feeder.close()

    t = threading.Thread(target=loader)
    t.start()
    try:
        session.run()
    finally:
        t.join()
    return errors


@pytest.fixture
def one_bucket(tmp_path):
    save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    return plan_buckets(read_checkpoint(tmp_path), 1 << 16)


@pytest.fixture
def given_back(monkeypatch):
    """Who gave back which IPC reference: ("loader", counter) from the feeder, ("rank", counter) from a receiver
    closing what it opened."""
    from sglang_ckpt_plugin.loader import push

    record = []
    monkeypatch.setattr(push, "give_back_ipc_reference", lambda h: record.append(("loader", h.ref_counter_offset)))
    return record


def _feeder_with_cuda_buffers(n: int, timeout_s: float = 10.0) -> tuple[RankFeeder, str]:
    update_id = new_update_id("test")
    endpoint = make_endpoint(update_id, "cpu-tp0")
    feeder = RankFeeder(endpoint, update_id, timeout_s, threading.Event())
    buffers = [FakeCudaBuffer() for _ in range(n)]
    for counter, buf in enumerate(buffers):
        buf.counter = counter
    feeder.adopt(buffers)
    return feeder, endpoint


def test_a_staged_update_refuses_cuda_ipc_buffers_and_the_loader_gives_back_what_the_rank_never_opened(
    one_bucket, given_back
):
    feeder, endpoint = _feeder_with_cuda_buffers(1)
    session = ReceiveSession(
        endpoint, torch.device("cpu"), lambda w: None, lambda: None, 10.0, lambda *a: CheckedUpdate({}), staging=True
    )
    with pytest.raises(UpdateRefused, match="host shared memory"):
        _hello_against(session, feeder, one_bucket)
    assert given_back == [("loader", 0)]  # the rank refused before opening it


def test_a_rank_that_opens_one_of_two_handles_and_the_loader_give_back_each_reference_once(
    one_bucket, given_back, monkeypatch
):
    """Buffer 1 will not open (a trainer container without a shared IPC namespace): the rank closes buffer 0 (its
    reference goes back with it), the loader gives back buffer 1's, which no rank holds."""
    from sglang_ckpt_plugin.server import receiver

    class Opened:
        def __init__(self, handle):
            self.handle = handle

        def views_alive(self):
            return False

        def close(self):
            given_back.append(("rank", self.handle.ref_counter_offset))

    def open_cuda(handle, device, fd=None):
        if handle.ref_counter_offset == 1:
            raise RuntimeError("pidfd_getfd: Operation not permitted")
        return Opened(handle)

    monkeypatch.setattr(receiver, "open_buffer", open_cuda)
    feeder, endpoint = _feeder_with_cuda_buffers(2)
    session = ReceiveSession(
        endpoint, torch.device("cpu"), lambda w: None, lambda: None, 10.0, lambda *a: CheckedUpdate({})
    )
    with pytest.raises(receiver.UpdateFailed, match="cannot map the loader's buffers"):
        _hello_against(session, feeder, one_bucket)
    assert sorted(given_back) == [("loader", 1), ("rank", 0)]


def test_a_rank_that_never_answers_the_hello_keeps_its_references_from_being_given_back_twice(one_bucket, given_back):
    """A live rank that took the hello but did not answer in time may have opened the handles: giving them back
    here as well would let torch free a buffer the rank still reads. They stay allocated instead."""
    from sglang_ckpt_plugin.transport.channel import Channel

    feeder, endpoint = _feeder_with_cuda_buffers(2, timeout_s=1.0)
    errors = []

    def loader():
        try:
            feeder.hello(one_bucket)
        except PushError as exc:
            errors.append(str(exc))
        finally:
            feeder.close()

    t = threading.Thread(target=loader)
    t.start()
    with Channel(endpoint, bind=False) as silent_rank:
        assert silent_rank.recv(5).buffers  # it took the hello, and says nothing
        t.join()
    assert "did not accept the update within 1 s" in errors[0]
    assert given_back == []


def test_trainer_push_never_moves_the_trainers_current_device(monkeypatch):
    from sglang_ckpt_plugin import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "visible_gpu_keys", lambda: ["GPU-a", "GPU-b", "GPU-c"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the trainer's GPU is the server's rank 0 GPU

    def set_device(_):
        raise AssertionError("TrainerPush changed the trainer's current device")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    server = ServerPlacement("cuda", ["GPU-a", "GPU-b"], tp_size=2)
    assert trainer_mod.TrainerPush("http://127.0.0.1:9")._choose_device(server) == torch.device("cuda", 2)


class FakeBuffer:
    def __init__(self, nbytes, device, reusable=False):
        self.nbytes, self.device, self.released = nbytes, device, False

    def release(self):
        self.released = True


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_local_push_shares_fresh_cuda_storages_for_every_push_and_keeps_shared_memory(monkeypatch, kind):
    """torch nests an IPC record into a CUDA storage each time it is shared, kept until the storage is freed: a
    LocalPush's CUDA buffers are made again (same sizes, from torch's cache) for every push, the old ones released
    first, without handing the cache back to the device; shared-memory buffers are kept across pushes."""
    from sglang_ckpt_plugin import local_push

    monkeypatch.setattr(local_push, "allocate_buffer", FakeBuffer)
    emptied = []
    monkeypatch.setattr(local_push, "return_cached_device_memory", lambda: emptied.append(True))
    pusher = local_push.LocalPush("http://127.0.0.1:9")
    pusher.device = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
    pusher._ensure_buffers(100, 2)
    first = list(pusher.buffers)
    emptied.clear()
    pusher._ensure_buffers(80, 1)  # a smaller push: the buffers it has serve it
    if kind == "cuda":
        assert all(b.released for b in first) and not set(map(id, pusher.buffers)) & set(map(id, first))
        assert [b.nbytes for b in pusher.buffers] == [100, 100] and emptied == []
    else:
        assert pusher.buffers == first and not any(b.released for b in first)
    pusher._ensure_buffers(200, 1)  # larger: made again, and on a GPU the old blocks go back to the device
    assert [b.nbytes for b in pusher.buffers] == [200] and emptied == ([True] if kind == "cuda" else [])
