"""Bucket buffers that a loader owns and an inference rank maps without copying.

Two kinds behind one interface:
- CPU: a POSIX shared-memory object ``/dev/shm/sglang-ckpt-*`` (mode 0600, same user only), mapped by both.
- CUDA: a device allocation shared with CUDA IPC (``UntypedStorage._share_cuda_`` / ``_new_shared_cuda``).

Owner side: ``allocate_buffer(nbytes, device)`` -> OwnedBuffer (``.tensor``, ``.handle()``, ``.release()``; a
shared-memory buffer also has ``.view``, a memoryview: a CPU loader fills it without importing torch).
Receiver side: ``open_buffer(handle, device)`` -> MappedBuffer (``.tensor``, ``.close()``).
Buffers are allocated once and reused for every bucket; shared memory is reserved with ``fallocate`` (a full
/dev/shm fails at once) and its pages are faulted in by the first fill, not pre-faulted (that cost 0.3-0.4 s per GB
in the loader here, against 0.08 s for the reservation).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import warnings
from functools import cached_property
from typing import TYPE_CHECKING

from ..placement import peer_unreadable
from .messages import BufferHandle, CudaIpcHandle, FileHandle, ShmFdHandle, ShmHandle

if TYPE_CHECKING:  # imported where used: the one-rank page-cache loader hands files over and never needs torch
    import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "sglang-ckpt-"
_SHM_NAME = re.compile(r"^sglang-ckpt-[A-Za-z0-9_-]{1,100}$")


def device_kind(device: torch.device | str | None) -> str:
    """ "cpu" or "cuda" of a torch.device or its name; None is host memory (a CPU loader never makes a torch.device,
    so that it never imports torch)."""
    return "cpu" if device is None else str(device).split(":")[0]


def device_rank_key(device: torch.device, tp_rank: int, replica: int | None = None, stage: int | None = None) -> str:
    """How a loader names the inference rank it feeds, in ``zmq_handles`` keys.

    CUDA: ``GPU-<uuid>`` of the device (unique per GPU, independent of CUDA_VISIBLE_DEVICES).
    CPU: ``cpu-tp<rank>``, the rank's index inside its TP group; on a server whose TP groups repeat, the group
    first: ``cpu-dp<replica>-tp<rank>`` with data-parallel replicas (``--dp N``), ``cpu-pp<stage>-tp<rank>`` with
    pipeline stages (``--pp-size N``), ``cpu-dp<replica>-pp<stage>-tp<rank>`` with both.
    """
    import torch

    if device.type == "cuda":
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    groups = ([f"dp{replica}"] if replica is not None else []) + ([f"pp{stage}"] if stage is not None else [])
    return "-".join(["cpu", *groups, f"tp{tp_rank}"])


def visible_gpu_keys() -> list[str]:
    """``GPU-<uuid>`` of every GPU this process sees, by local index (no CUDA context is made)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [device_rank_key(torch.device("cuda", i), -1) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- owner side (loader)
class ShmBuffer:
    """A shared-memory bucket buffer owned by the loader. ``release()`` unmaps and unlinks it.

    Named (``/dev/shm/sglang-ckpt-*``) for one update: the name is removed as soon as the server mapped it.
    ``reusable=True``: an unnamed O_TMPFILE file kept open for many updates; its descriptor is handed to the
    server over a Unix socket (fdpass.py), so there is no name to leak even if this process is killed.
    """

    def __init__(self, nbytes: int, reusable: bool = False):
        self.nbytes = nbytes
        self.reusable = reusable
        self.name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = None if reusable else os.path.join(SHM_DIR, self.name)
        if reusable:
            fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
        else:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC instead of SIGBUS mid-copy.
            os.posix_fallocate(fd, 0, nbytes)
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        self._fd = fd if reusable else None
        if not reusable:
            os.close(fd)
        self.view = memoryview(self._map)

    @cached_property
    def tensor(self) -> torch.Tensor:
        import torch

        return torch.frombuffer(self._map, dtype=torch.uint8)

    @property
    def fd(self) -> int | None:
        """The descriptor to hand over (SCM_RIGHTS) instead of a name; None for a named buffer."""
        return self._fd

    def handle(self, slot: int = -1) -> ShmHandle | ShmFdHandle:
        if self.reusable:
            return ShmFdHandle(slot=slot, nbytes=self.nbytes)
        return ShmHandle(name=self.name, nbytes=self.nbytes)

    def unlink(self) -> None:
        """Remove the name; mappings stay valid. Safe to call once every receiver has mapped it."""
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self.unlink()
        self.__dict__.pop("tensor", None)
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive (e.g. in the traceback of an interrupted fill): the
            pass  # mapping goes when that view does; the descriptor is closed now either way
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LentFile:
    """A server rank's kept buffer file, lent to this loader for one update (``--keep-update-buffers``): mapped
    with its page tables filled at once (its pages exist already), cut into LentBuffers."""

    def __init__(self, fd: int, nbytes: int, offsets: list[int], sizes: list[int]):
        try:
            _check_private_file(fd, "the server's kept buffer file", nbytes, announced_by="the server")
            if any(o % mmap.PAGESIZE or o + n > nbytes for o, n in zip(offsets, sizes)):
                raise ValueError(f"the server lent {nbytes} bytes with offsets {offsets[:8]}...: they do not fit")
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.buffers = [LentBuffer(self, o, n) for o, n in zip(offsets, sizes)]

    def release(self) -> None:
        for b in self.buffers:
            b.release()
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive (a traceback): it goes when that view does
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LentBuffer:
    """One bucket buffer inside a LentFile; the same interface as ShmBuffer."""

    def __init__(self, file: LentFile, offset: int, nbytes: int):
        self.file, self.offset, self.nbytes = file, offset, nbytes
        self.view = memoryview(file._map)[offset : offset + nbytes]

    @cached_property
    def tensor(self) -> torch.Tensor:
        import torch

        return torch.frombuffer(self.view, dtype=torch.uint8)

    @property
    def fd(self) -> int | None:
        return self.file.fd

    def handle(self, slot: int = -1) -> ShmFdHandle:
        return ShmFdHandle(slot=slot, nbytes=self.nbytes, offset=self.offset)

    def unlink(self) -> None:
        pass

    def release(self) -> None:
        self.__dict__.pop("tensor", None)
        try:
            self.view.release()
        except BufferError:  # still in use (a traceback): the file's mapping outlives it
            pass


class FileBuffer:
    """A checkpoint file offered as a read-only buffer (page-cache mode); nothing is allocated or copied."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.nbytes = os.fstat(self._fd).st_size

    @property
    def fd(self) -> int | None:
        return self._fd

    def handle(self, slot: int = -1) -> FileHandle:
        return FileHandle(slot=slot, nbytes=self.nbytes)

    def digests(self, bucket) -> list[int]:
        """xxh3 of each tensor of a bucket (slot offsets are file offsets), read through a private mapping."""
        from .integrity import bytes_digest

        with mmap.mmap(self._fd, self.nbytes, prot=mmap.PROT_READ) as m, memoryview(m) as view:
            return [bytes_digest(view[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]

    def unlink(self) -> None:
        pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def allocator_settings() -> str:
    """The caching allocator's settings as in force now (set at run time or from the environment)."""
    import torch

    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if get is not None:
        try:
            return get()
        except RuntimeError:
            pass
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def _settings_items(conf: str) -> list[str]:
    """``key:value`` items of an allocator config; commas inside ``[...]`` (roundup_power2_divisions) kept."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(conf + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            if conf[start:i].strip():
                items.append(conf[start:i].strip())
            start = i + 1
    return items


def expandable_segments_enabled(conf: str) -> bool:
    """``expandable_segments:True`` in the allocator settings (common in RL stacks)."""
    return any(item.replace(" ", "").lower() == "expandable_segments:true" for item in _settings_items(conf))


def with_expandable_segments(conf: str, enabled: bool) -> str:
    """``conf`` with only expandable_segments changed: setting the allocator's config re-parses all of it, so every
    other setting (max_split_size_mb, roundup_power2_divisions, garbage_collection_threshold...) is passed again."""
    kept = [item for item in _settings_items(conf) if item.split(":")[0].strip().lower() != "expandable_segments"]
    return ",".join([*kept, f"expandable_segments:{enabled}"])


def _set_allocator_settings(conf: str) -> None:
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(conf)


def give_back_ipc_reference(handle: CudaIpcHandle) -> None:
    """Drop the reference torch counts for the receiver of a CUDA IPC handle, where no receiver took the handle
    (what the receiver's close does otherwise): torch frees a shared allocation only once every handle made of it
    was given back."""
    import torch

    torch.UntypedStorage._release_ipc_counter_cuda(handle.ref_counter_handle, handle.ref_counter_offset)


def return_cached_device_memory() -> None:
    """After bucket buffers were dropped: free what the server's mappings held (torch keeps a shared block until
    its counters reach zero and it collects) and hand torch's cached blocks back to the device, so the memory is
    the GPU's again (SGLang's KV cache shares it) and the next memory budget does not count it twice."""
    import torch

    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()


class CudaBuffer:
    """A device bucket buffer shared through CUDA IPC; freed when the loader drops it.

    torch keeps a shared allocation alive until the IPC reference counter of every handle made of it reaches zero:
    the receiver that maps a handle and later closes it brings it there. Each handle (one per rank and update: one
    loader process may feed every rank of a node) has its own counter; the RankFeeder that sent one that no rank
    answered for (the server refused the request, never connected, or never answered the hello) gives it back."""

    def __init__(self, nbytes: int, device: torch.device):
        import torch

        self.nbytes = nbytes
        self.device = device
        conf = allocator_settings()
        expandable = expandable_segments_enabled(conf)
        if expandable:  # torch cannot share an expandable segment by CUDA IPC: this allocation gets a classic one
            _set_allocator_settings(with_expandable_segments(conf, False))
        try:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        finally:
            if expandable:
                _set_allocator_settings(conf)  # exactly the settings found

    fd = None  # shared by CUDA IPC, not by descriptor

    def handle(self, slot: int = -1) -> CudaIpcHandle:
        (_dev, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
            self.tensor.untyped_storage()._share_cuda_()
        )
        return CudaIpcHandle(
            nbytes=self.nbytes,
            device_uuid=device_rank_key(self.device, -1),
            handle=handle,
            storage_size_bytes=size,
            storage_offset_bytes=offset,
            ref_counter_handle=ref_handle,
            ref_counter_offset=ref_offset,
            event_handle=event_handle,
            event_sync_required=event_sync,
        )

    def unlink(self) -> None:
        pass

    def release(self) -> None:
        self.tensor = None


def allocate_buffer(nbytes: int, device: torch.device | str | None, reusable: bool = False) -> ShmBuffer | CudaBuffer:
    """``reusable``: the buffer may serve many updates (CUDA IPC buffers always can). ``device``: see device_kind."""
    kind = device_kind(device)
    if kind == "cuda":
        return CudaBuffer(nbytes, device)
    if kind != "cpu":
        raise ValueError(f"unsupported device {device}")
    return ShmBuffer(nbytes, reusable=reusable)


# ---------------------------------------------------------------- receiver side (inference rank)
class MappedBuffer:
    """A loader buffer seen from an inference rank. ``close()`` must follow once no view is in use."""

    def __init__(self, tensor: torch.Tensor, mapping: mmap.mmap | None = None, base: int = 0):
        self.tensor = tensor
        self._mapping = mapping
        self.base = base  # byte offset of tensor[0] in the loader's buffer (a file range maps from here)
        self._baseline = _storage_users(tensor)

    def views_alive(self) -> bool:
        """Does anything besides ``self.tensor`` still use this memory (a view some model kept)?"""
        return self.tensor is not None and _storage_users(self.tensor) > self._baseline

    def close(self) -> None:
        """Unmap. BufferError, leaving the mapping in place, while a view into it is alive: unmapping would leave
        that view pointing at unmapped memory (``mmap.close`` does not see torch's views)."""
        if self.views_alive():
            raise BufferError("a view into this loader buffer is still referenced")
        self.tensor = None
        if self._mapping is not None:
            self._mapping.close()


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s storage (torch's own count; 0 where this torch lacks it)."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(tensor.untyped_storage()._cdata) if use_count is not None else 0


def open_buffer(handle: BufferHandle, device: torch.device, fd: int | None = None) -> MappedBuffer:
    """Map a loader's buffer. ``fd``: the descriptor received for a ShmFdHandle (the caller keeps ownership)."""
    if isinstance(handle, FileHandle):
        raise ValueError("checkpoint-file handles are mapped one byte range at a time (open_file_range)")
    if isinstance(handle, (ShmHandle, ShmFdHandle)):
        # Any rank: on a CUDA rank the views are host memory and load_weights copies them to the GPU (as SGLang's
        # disk loader does), the fallback where the loader cannot reach the rank's GPU by CUDA IPC.
        return _open_shm(handle, fd)
    if device.type != "cuda":
        raise ValueError("a CUDA IPC buffer was sent to a CPU rank; run the loader with --device cpu (or auto)")
    own = device_rank_key(device, -1)
    if handle.device_uuid != own:  # one loader process feeds the node: the buffer is on another rank's GPU
        import torch

        problem = peer_unreadable(own, handle.device_uuid, visible_gpu_keys(), torch.cuda.can_device_access_peer)
        if problem:
            raise ValueError(
                f"a CUDA IPC buffer on {handle.device_uuid} was sent to the rank on {own}, which cannot read it: "
                f"{problem}; feed each TP rank from its own GPU (a loader rank per TP rank) or use --device cpu"
            )
    return _open_cuda(handle, device)


def _check_private_file(fd: int, what: str, nbytes: int, announced_by: str = "the loader") -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{what}: must be a private (0600) file of this user")
    if st.st_size < nbytes:
        raise ValueError(f"{what}: {st.st_size} bytes, {announced_by} announced {nbytes}")


def _map_read_only(fd: int, length: int, offset: int = 0) -> mmap.mmap:
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ, offset=offset)


def read_only_view(mapping: mmap.mmap | memoryview) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # read-only memory: torch warns that writing would be undefined; we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


def _open_shm(handle: ShmHandle | ShmFdHandle, fd: int | None) -> MappedBuffer:
    """Read-only: the rank only ever reads a loader's buffer."""
    if isinstance(handle, ShmFdHandle):
        if fd is None:
            raise ValueError(f"no descriptor was handed over for {handle!r}")
        what = f"shared-memory buffer (slot {handle.slot}, offset {handle.offset})"
        if handle.offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"{what}: the offset is not a multiple of {mmap.ALLOCATIONGRANULARITY}")
        _check_private_file(fd, what, handle.offset + handle.nbytes)
        mapping = _map_read_only(fd, handle.nbytes, handle.offset)
    else:
        if not _SHM_NAME.match(handle.name):
            raise ValueError(f"refusing shared-memory name {handle.name!r}: not one of ours")
        own = os.open(os.path.join(SHM_DIR, handle.name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            _check_private_file(own, handle.name, handle.nbytes)
            mapping = _map_read_only(own, handle.nbytes)
        finally:
            os.close(own)
    return MappedBuffer(read_only_view(mapping), mapping)


def open_file_range(fd: int, handle: FileHandle, start: int, end: int) -> MappedBuffer:
    """Map bytes [start, end) of a loader's open checkpoint file (its descriptor ``fd``, received over the
    socket), read-only: page-cache mode maps one bucket's range at a time, so the rank's resident memory grows
    by about one bucket."""
    import torch

    if not 0 <= start <= end <= handle.nbytes:
        raise ValueError(f"refusing file range [{start}, {end}) of a {handle.nbytes}-byte file")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < handle.nbytes:
        raise ValueError(f"file handle (slot {handle.slot}): not a regular file of {handle.nbytes} bytes")
    base = start - start % mmap.ALLOCATIONGRANULARITY
    if end == base:
        return MappedBuffer(torch.empty(0, dtype=torch.uint8), None, base)
    mapping = _map_read_only(fd, end - base, base)
    return MappedBuffer(read_only_view(mapping), mapping, base)


def _open_cuda(handle: CudaIpcHandle, device: torch.device) -> MappedBuffer:
    import torch

    # Our own device index, also for a buffer on a peer GPU: torch opens the handle with that device current and
    # lazy peer access, so no context is made on the peer (hundreds of MB there), and the views copy peer to peer.
    # (The loader may also see our GPU under another index: CUDA_VISIBLE_DEVICES.)
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index if device.index is not None else torch.cuda.current_device(),
        handle.handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        # No IPC event: opening one per buffer per update leaks it in a long-lived server, and makes our stream
        # wait on whatever the loader had queued when it shared. The loader synchronises its copies before it
        # announces a bucket, which is the only ordering the receiver needs.
        False,
    )
    tensor = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (handle.nbytes,), (1,))
    return MappedBuffer(tensor)
