"""Bucket buffers that a loader owns and an inference rank maps without copying.

Two kinds behind one interface:
- CPU: a POSIX shared-memory object ``/dev/shm/sglang-ckpt-*`` (mode 0600, same user only), mapped by both.
- CUDA: a device allocation shared with CUDA IPC (``UntypedStorage._share_cuda_`` / ``_new_shared_cuda``).

Owner side: ``allocate_buffer(nbytes, device)`` -> OwnedBuffer (``.tensor``, ``.handle()``, ``.release()``).
Receiver side: ``open_buffer(handle, device)`` -> MappedBuffer (``.tensor``, ``.close()``).
Buffers are allocated and touched once, then reused for every bucket (first touch costs ~10x a copy).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import warnings

import torch

from .messages import BufferHandle, CudaIpcHandle, FileHandle, ShmFdHandle, ShmHandle

SHM_DIR = "/dev/shm"
SHM_PREFIX = "sglang-ckpt-"
_SHM_NAME = re.compile(r"^sglang-ckpt-[A-Za-z0-9_-]{1,100}$")


def device_rank_key(device: torch.device, tp_rank: int) -> str:
    """How a loader names the inference rank it feeds, in ``zmq_handles`` keys.

    CUDA: ``GPU-<uuid>`` of the device (unique per GPU, independent of CUDA_VISIBLE_DEVICES).
    CPU: ``cpu-tp<rank>``, the rank's index inside its inference instance (= loader rank % parallel size).
    """
    if device.type == "cuda":
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    return f"cpu-tp{tp_rank}"


# ---------------------------------------------------------------- owner side (loader)
class ShmBuffer:
    """A shared-memory bucket buffer owned by the loader. ``release()`` unmaps and unlinks it.

    Named (``/dev/shm/sglang-ckpt-*``) for one update: the name is removed as soon as the server mapped it.
    ``reusable=True``: an unnamed O_TMPFILE file kept open for many updates; the server opens it through
    ``/proc/<pid>/fd/<fd>``, so there is no name to leak even if this process is killed.
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
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        self._fd = fd if reusable else None
        if not reusable:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    def handle(self) -> ShmHandle | ShmFdHandle:
        if self.reusable:
            return ShmFdHandle(pid=os.getpid(), fd=self._fd, nbytes=self.nbytes)
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
        self.tensor = None
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileBuffer:
    """A checkpoint file offered as a read-only buffer (page-cache mode); nothing is allocated or copied."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.nbytes = os.fstat(self._fd).st_size

    def handle(self) -> FileHandle:
        return FileHandle(pid=os.getpid(), fd=self._fd, nbytes=self.nbytes)

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


class CudaBuffer:
    """A device bucket buffer shared through CUDA IPC; freed when the loader drops it."""

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes = nbytes
        self.device = device
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def handle(self) -> CudaIpcHandle:
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


def allocate_buffer(nbytes: int, device: torch.device, reusable: bool = False) -> ShmBuffer | CudaBuffer:
    """``reusable``: the buffer may serve many updates (CUDA IPC buffers always can)."""
    if device.type == "cuda":
        return CudaBuffer(nbytes, device)
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device}")
    return ShmBuffer(nbytes, reusable=reusable)


# ---------------------------------------------------------------- receiver side (inference rank)
class MappedBuffer:
    """A loader buffer seen from an inference rank. ``close()`` must follow once no view is in use."""

    def __init__(self, tensor: torch.Tensor, mapping: mmap.mmap | None = None, base: int = 0):
        self.tensor = tensor
        self._mapping = mapping
        self.base = base  # byte offset of tensor[0] in the loader's buffer (a file range maps from here)

    def close(self) -> None:
        self.tensor = None
        if self._mapping is not None:
            self._mapping.close()


def open_buffer(handle: BufferHandle, device: torch.device) -> MappedBuffer:
    if isinstance(handle, FileHandle):
        if device.type != "cpu":
            raise ValueError(f"a checkpoint-file buffer was sent to a {device.type} rank; run the loader on {device.type}")
        return _open_file(handle)
    if isinstance(handle, (ShmHandle, ShmFdHandle)):
        if device.type != "cpu":
            raise ValueError(f"a shared-memory buffer was sent to a {device.type} rank; run the loader on {device.type}")
        return _open_shm(handle)
    if device.type != "cuda":
        raise ValueError("a CUDA IPC buffer was sent to a CPU rank; run the loader with --device cpu")
    return _open_cuda(handle, device)


def _open_shm(handle: ShmHandle | ShmFdHandle) -> MappedBuffer:
    if isinstance(handle, ShmFdHandle):
        if handle.pid <= 0 or handle.fd < 0:
            raise ValueError(f"refusing shared-memory handle {handle!r}")
        what = f"/proc/{handle.pid}/fd/{handle.fd}"
        fd = os.open(what, os.O_RDWR)  # the kernel checks we may access that process (same user)
    else:
        if not _SHM_NAME.match(handle.name):
            raise ValueError(f"refusing shared-memory name {handle.name!r}: not one of ours")
        what = handle.name
        fd = os.open(os.path.join(SHM_DIR, handle.name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{what}: must be a private (0600) file of this user")
        if st.st_size < handle.nbytes:
            raise ValueError(f"{what}: {st.st_size} bytes, the loader announced {handle.nbytes}")
        mapping = mmap.mmap(fd, handle.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
    return MappedBuffer(torch.frombuffer(mapping, dtype=torch.uint8), mapping)


def open_file_range(handle: FileHandle, start: int, end: int) -> MappedBuffer:
    """Map bytes [start, end) of a loader's open checkpoint file, read-only (page-cache mode maps one bucket's
    range at a time, so the rank's resident memory grows by about one bucket). Views are only ever read."""
    if handle.pid <= 0 or handle.fd < 0 or not 0 <= start <= end <= handle.nbytes:
        raise ValueError(f"refusing file handle {handle!r} range [{start}, {end})")
    fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDONLY)  # the kernel checks access (same user)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < handle.nbytes:
            raise ValueError(f"file handle {handle.pid}/{handle.fd}: not a regular file of {handle.nbytes} bytes")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        if end == base:
            return MappedBuffer(torch.empty(0, dtype=torch.uint8), None, base)
        mapping = mmap.mmap(fd, end - base, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                            offset=base)  # fmt: skip
    finally:
        os.close(fd)
    with warnings.catch_warnings():  # read-only memory: torch warns that writing would be undefined; we never write
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    return MappedBuffer(tensor, mapping, base)


def _open_file(handle: FileHandle) -> MappedBuffer:
    return open_file_range(handle, 0, handle.nbytes)


def _open_cuda(handle: CudaIpcHandle, device: torch.device) -> MappedBuffer:
    # Our own device index: the loader may see the GPU under another index (CUDA_VISIBLE_DEVICES).
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index if device.index is not None else torch.cuda.current_device(),
        handle.handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )
    tensor = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (handle.nbytes,), (1,))
    return MappedBuffer(tensor)
