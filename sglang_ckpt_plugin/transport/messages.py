"""Typed, versioned wire messages between a loader rank and one inference (TP) rank.

Every message is one ZeroMQ frame of JSON, decoded by msgspec into exactly one of the Structs below
(strict types, unknown tags rejected). Nothing is ever unpickled. docs/protocol.md is the description of
this file; keep the two in step and bump PROTOCOL_VERSION on any incompatible change.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 2

# Caps: a frame is at most MAX_MESSAGE_BYTES (channel.py); these bound what one decodes into.
MAX_TENSORS = 1 << 18  # per update (the manifest); DeepSeek-V3 has about 92k tensors
MAX_BUCKET_TENSORS = 1 << 16
MAX_BUFFERS = 253  # descriptors handed over in one SCM_RIGHTS message
MAX_NAME = 1024
MAX_DIMS = 8
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_DIMS)]

# dtype names as torch spells them (without the "torch." prefix) -> bytes per element
WIRE_DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
WIRE_DTYPES = tuple(WIRE_DTYPE_ITEMSIZE)

# Two-phase updates ride SGLang's own ``/update_weights_from_ipc`` request (its auth, its fan-out to every TP rank):
# this reserved key of ``zmq_handles`` names the phase. "stage": each rank receives and checks the bytes in the
# background, the served weights untouched, without SGLang's model-update lock; "commit": under the lock, each rank
# loads what it staged (the other keys map rank keys to the staged update's id); "abort": each rank drops what it
# staged and records why the update did not happen. Absent: one streaming update.
# A draft model with a checkpoint of its own travels in the same update, its tensors named with this prefix
# (``--draft-checkpoint-path``; the server strips it and hands them to the draft: server/drafts.py).
DRAFT_PREFIX = "draft."
PHASE_KEY = "ckpt_plugin.phase"
PHASES = ("stage", "commit", "abort")


class ProtocolError(ValueError):
    """A message that does not decode or does not fit the session; the update fails, weights untouched."""


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True):
    pass


class ShmHandle(msgspec.Struct, tag="shm", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """A POSIX shared-memory object, /dev/shm/<name>, created 0600 by the loader."""

    name: str
    nbytes: int


class CudaIpcHandle(msgspec.Struct, tag="cuda_ipc", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """The fields of ``torch.UntypedStorage._share_cuda_()``, with byte strings as bytes (base64 in JSON)."""

    nbytes: int
    device_uuid: str
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class ShmFdHandle(msgspec.Struct, tag="shm_fd", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """An unnamed shared-memory file (O_TMPFILE on /dev/shm) of a live loader. Never has a name, so it cannot
    outlive its owner: used for buffers kept across updates. Its descriptor is handed over with SCM_RIGHTS
    (fdpass.py); ``slot`` is its index among the descriptors of this hello. Several buffers may share one file
    (buffers a server rank keeps: ``offset``, page-aligned, is where this one begins)."""

    slot: int
    nbytes: int
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class FileHandle(msgspec.Struct, tag="file", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """A checkpoint file the loader holds open read-only, its descriptor handed over like ShmFdHandle's; the
    rank maps it read-only and loads tensors straight from the page cache: no loader-side copy (same node, CPU)."""

    slot: int
    nbytes: int


BufferHandle = ShmHandle | ShmFdHandle | FileHandle | CudaIpcHandle


class TensorSlot(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """One tensor inside a bucket: [name, dtype, shape, offset]; byte size follows from dtype and shape."""

    name: Name
    dtype: str
    shape: Shape
    offset: int


class TensorMeta(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """One tensor of the whole update: [name, dtype, shape]."""

    name: Name
    dtype: str
    shape: Shape


class Hello(_Msg, tag="hello"):
    """Opens an update on one rank: the buffers to map (once per update) and what will follow."""

    protocol_version: int
    update_id: str
    buffers: Annotated[list[BufferHandle], msgspec.Meta(max_length=MAX_BUFFERS)]
    num_buckets: int
    num_tensors: int
    total_bytes: int
    # every tensor of the update: checked against the model before anything is written, and every bucket
    # is checked against it (names, dtypes, shapes; each tensor once) before it is loaded
    manifest: Annotated[list[TensorMeta], msgspec.Meta(max_length=MAX_TENSORS)]
    # every bucket carries per-tensor digests: xxh3 of host bytes, or word sums (GPU buffers: checked in place)
    checksum: Literal["none", "xxh3", "wordsum"] = "none"
    partial: bool = False  # the caller updates only some parameters on purpose
    allow_unused: bool = False  # the caller knows some tensors are not weights of the served model


class BuffersWanted(_Msg, tag="buffers_wanted"):
    """Loader -> the first rank it feeds, before the hello, where the server keeps update buffers
    (``--keep-update-buffers``): lend me buffers of these sizes. Answered by BuffersGranted, the file's descriptor
    handed over on ``<endpoint>.kept`` (fdpass.FdInbox), or by a Reply(seq=-2, ok=False) saying why not."""

    sizes: Annotated[list[Annotated[int, msgspec.Meta(gt=0)]], msgspec.Meta(max_length=MAX_BUFFERS)]


class BuffersGranted(_Msg, tag="buffers_granted"):
    """The buffers lent for this update: one file of ``nbytes``, buffer i at ``offsets[i]`` (page-aligned)."""

    offsets: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_BUFFERS)]
    nbytes: int


class BucketReady(_Msg, tag="bucket"):
    """Buffer ``buffer`` holds these tensors; load them, then reply so the loader may refill the buffer."""

    seq: int
    buffer: int
    tensors: Annotated[list[TensorSlot], msgspec.Meta(max_length=MAX_BUCKET_TENSORS)]
    digests: list[int] | None = None  # each tensor's digest (the hello's ``checksum``), in ``tensors`` order


class Finish(_Msg, tag="finish"):
    """All buckets sent; run post-load processing, release the buffers, reply with the result."""

    seq: int


class Abort(_Msg, tag="abort"):
    """The loader gives up (another rank failed, bad input...); the worker ends the update as failed."""

    reason: str


class Reply(_Msg, tag="reply"):
    """Worker -> loader acknowledgement of message ``seq`` (hello is seq -1; a refused BuffersWanted -2)."""

    seq: int
    ok: bool
    error: str = ""
    elapsed_s: float = 0.0  # worker time spent on that message (load_weights, post-processing)
    written_bytes: int = 0  # hello only: bytes of this rank's parameters the update writes (its slice, not the model)
    # hello only: the buffers (indices into the hello's) whose CUDA IPC handle this rank opened, and so gives back
    # when it closes them; the loader gives back the reference of every other CUDA IPC handle it sent
    opened: list[int] = []


Message = Hello | BuffersWanted | BuffersGranted | BucketReady | Finish | Abort | Reply

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Decode and check one frame. Raises ProtocolError, never anything else."""
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    _check(msg)
    return msg


def _check(msg: Message) -> None:
    if isinstance(msg, Hello):
        if msg.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {msg.protocol_version} from the loader, server speaks {PROTOCOL_VERSION}; "
                "install the same sglang-ckpt-plugin version on both sides"
            )
        if not msg.buffers or any(b.nbytes <= 0 for b in msg.buffers):
            raise ProtocolError("hello must name at least one non-empty buffer")
        if min(msg.num_buckets, msg.num_tensors, msg.total_bytes) < 0:
            raise ProtocolError("hello has negative counts")
        # one descriptor per file: a checkpoint file's slot is its own; buffers that are ranges of one shared-memory
        # file (lent by the server) share theirs
        file_slots = [b.slot for b in msg.buffers if isinstance(b, FileHandle)]
        slots = sorted([*file_slots, *{b.slot for b in msg.buffers if isinstance(b, ShmFdHandle)}])
        if slots != list(range(len(slots))):
            raise ProtocolError("hello descriptor slots must be 0..n-1")
        if msg.num_tensors != len(msg.manifest):
            raise ProtocolError(f"hello announces {msg.num_tensors} tensors but its manifest lists {len(msg.manifest)}")
        for meta in msg.manifest:
            if meta.dtype not in WIRE_DTYPES:
                raise ProtocolError(f"manifest entry {meta.name!r}: unknown dtype {meta.dtype!r}")
    elif isinstance(msg, BucketReady):
        if msg.seq < 0 or msg.buffer < 0:
            raise ProtocolError("bucket seq and buffer must be >= 0")
        if msg.digests is not None and len(msg.digests) != len(msg.tensors):
            raise ProtocolError("bucket digests must match its tensors one to one")
        for slot in msg.tensors:
            if slot.dtype not in WIRE_DTYPES:
                raise ProtocolError(f"tensor {slot.name!r}: unknown dtype {slot.dtype!r}")
            if slot.offset < 0:
                raise ProtocolError(f"tensor {slot.name!r}: negative offset")
