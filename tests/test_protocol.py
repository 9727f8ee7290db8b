"""Unit tests: the wire codec is strict, versioned, and never crashes on garbage (fuzzed)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_ckpt_plugin.transport.messages import (
    MAX_BUCKET_TENSORS,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    Abort,
    BucketReady,
    BuffersGranted,
    BuffersWanted,
    CudaIpcHandle,
    FileHandle,
    Finish,
    Hello,
    ProtocolError,
    Reply,
    ShmFdHandle,
    ShmHandle,
    TensorMeta,
    TensorSlot,
    decode,
    encode,
)

HELLO = Hello(
    protocol_version=PROTOCOL_VERSION,
    update_id="u-1",
    num_buckets=2,
    num_tensors=2,
    total_bytes=100,
    buffers=[
        ShmHandle(name="sglang-ckpt-1-ab", nbytes=4096),
        ShmFdHandle(slot=1, nbytes=64),
        FileHandle(slot=0, nbytes=9),
        CudaIpcHandle(
            nbytes=8,
            device_uuid="GPU-x",
            handle=b"\x00\xff",
            storage_size_bytes=8,
            storage_offset_bytes=0,
            ref_counter_handle=b"r",
            ref_counter_offset=0,
            event_handle=b"e",
            event_sync_required=True,
        ),
    ],
    manifest=[TensorMeta("w", "bfloat16", [2, 3]), TensorMeta("b", "float32", [3])],
)
MESSAGES = [
    HELLO,
    BucketReady(seq=0, buffer=1, tensors=[TensorSlot("w", "bfloat16", [2, 3], 256)]),
    Finish(seq=2),
    Abort(reason="boom"),
    Reply(seq=-1, ok=False, error="nope", elapsed_s=0.5),
    BuffersWanted(sizes=[1 << 20, 1 << 20]),
    BuffersGranted(offsets=[0, 1 << 20], nbytes=2 << 20),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    json.loads(data)  # plain JSON on the wire
    assert decode(data) == msg


def test_wire_shape_is_documented_json():
    doc = json.loads(encode(MESSAGES[1]))
    assert doc == {
        "type": "bucket",
        "seq": 0,
        "buffer": 1,
        "tensors": [["w", "bfloat16", [2, 3], 256]],
        "digests": None,
    }


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x80\x04pickle", "malformed"),
        (b'{"type": "exec", "code": "rm -rf"}', "malformed"),
        (b'{"type": "finish", "seq": 1, "extra": 1}', "malformed"),
        (b'{"type": "bucket", "seq": 0, "buffer": 0, "tensors": [["w", "complex64", [1], 0]]}', "unknown dtype"),
        (b'{"type": "bucket", "seq": 0, "buffer": 0, "tensors": [["w", "float32", [-1], 0]]}', ">= 0"),
        (b'{"type": "bucket", "seq": -3, "buffer": 0, "tensors": []}', ">= 0"),
        (b'{"type": "finish", "seq": "1"}', "malformed"),
        (
            b'{"type": "bucket", "seq": 0, "buffer": 0, "tensors": [["w", "float32", [1,1,1,1,1,1,1,1,1], 0]]}',
            "malformed",
        ),  # more than MAX_DIMS dimensions
        (
            b'{"type": "bucket", "seq": 0, "buffer": 0, "tensors": [["' + b"n" * 2000 + b'", "float32", [1], 0]]}',
            "malformed",
        ),  # name longer than MAX_NAME
    ],
)
def test_rejects(raw, match):
    with pytest.raises(ProtocolError, match=match):
        decode(raw)


def _hello_doc(**changes) -> bytes:
    doc = json.loads(encode(HELLO))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"manifest": None}, "malformed"),  # the manifest is required
        ({"num_tensors": 3}, "manifest lists 2"),
        ({"buffers": [{"kind": "shm_fd", "slot": 1, "nbytes": 64}]}, "slots must be 0..n-1"),
        (
            {"buffers": [{"kind": "file", "slot": 0, "nbytes": 9}, {"kind": "shm_fd", "slot": 0, "nbytes": 9}]},
            "slots must be 0..n-1",
        ),
        ({"buffers": [{"kind": "shm_fd", "pid": 1, "fd": 3, "nbytes": 9}]}, "malformed"),  # no pid/fd on the wire
        (
            {"buffers": [{"kind": "file", "slot": 0, "nbytes": 9}, {"kind": "file", "slot": 0, "nbytes": 9}]},
            "slots must be 0..n-1",
        ),
        ({"buffers": [{"kind": "shm_fd", "slot": 0, "nbytes": 9, "offset": -4096}]}, "malformed"),
        ({"manifest": [["w", "float32", [2]]] * 2, "num_tensors": 2}, None),  # decodes; Manifest() refuses twins
    ],
)
def test_hello_rejects(changes, match):
    if match is None:
        from sglang_ckpt_plugin.server.receiver import Manifest

        hello = decode(_hello_doc(**changes))
        with pytest.raises(ProtocolError, match="the manifest names a tensor twice"):
            Manifest(hello)
        return
    with pytest.raises(ProtocolError, match=match):
        decode(_hello_doc(**changes))


def test_list_caps_bound_what_a_frame_decodes_into():
    too_many_slots = {
        "type": "bucket",
        "seq": 0,
        "buffer": 0,
        "tensors": [["w", "int8", [1], 0]] * (MAX_BUCKET_TENSORS + 1),
    }
    with pytest.raises(ProtocolError, match="malformed"):
        decode(json.dumps(too_many_slots).encode())
    with pytest.raises(ProtocolError, match="malformed"):
        decode(_hello_doc(manifest=[["w", "int8", [1]]] * (MAX_TENSORS + 1), num_tensors=MAX_TENSORS + 1))


def test_version_mismatch_is_explained():
    doc = json.loads(encode(HELLO))
    doc["protocol_version"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="same sglang-ckpt-plugin version"):
        decode(json.dumps(doc).encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)


def _nodes(doc, path=()):
    """Every (container, key) pair of a decoded JSON document, nested ones included."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield doc, k
            yield from _nodes(v)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield doc, i
            yield from _nodes(v)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(MESSAGES), st.integers(0, 10_000), json_values)
def test_fuzz_mutated_messages_only_raise_protocol_error(msg, pick, value):
    """Replace any node (buffers, handle fields, manifest entries, shapes, sizes...) with any JSON value."""
    doc = json.loads(encode(msg))
    nodes = list(_nodes(doc))
    container, key = nodes[pick % len(nodes)]
    container[key] = value
    try:
        decoded = decode(json.dumps(doc).encode())
    except ProtocolError:
        return
    assert type(decoded) is type(msg)


def test_checkpoint_engine_first_frame_is_recognised_without_unpickling():
    """Pickle protocols 2-5 by their opening bytes; our own typed messages and plain text are not pickles; only
    abstract sockets (checkpoint-engine's) are ever sniffed."""
    import pickle

    from sglang_ckpt_plugin.server.foreign import looks_like_pickle, may_be_checkpoint_engine

    for protocol in (2, 3, 4, 5):
        assert looks_like_pickle(pickle.dumps(("handle", (1, 2)), protocol=protocol))
    assert not looks_like_pickle(b'{"kind":"hello"}') and not looks_like_pickle(b"") and not looks_like_pickle(b"\x80")
    assert may_be_checkpoint_engine("ipc://@checkpoint-engine-GPU-1-0.sock")
    assert not may_be_checkpoint_engine("ipc:///run/sglang-ckpt/x.sock") and not may_be_checkpoint_engine("tcp://h:1")


def test_ranges_of_one_lent_file_share_its_descriptor_slot():
    """Buffers a server rank lends are ranges of one file: one descriptor, each buffer at its offset."""
    buffers = [{"kind": "shm_fd", "slot": 0, "nbytes": 9, "offset": o} for o in (0, 4096)]
    hello = decode(_hello_doc(buffers=buffers))
    assert [(b.slot, b.offset) for b in hello.buffers] == [(0, 0), (0, 4096)]
