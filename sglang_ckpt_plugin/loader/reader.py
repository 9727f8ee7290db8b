"""Fill a bucket buffer with checkpoint bytes: ``preadv`` straight from the file into the buffer.

One copy (page cache -> bucket), no whole-file mmap in the loader's resident memory. On CUDA the bytes
land in pinned host staging halves first and are copied to the device buffer asynchronously, one half
while the other is read.
"""

from __future__ import annotations

import os

import torch
import xxhash

from ..transport.integrity import tensor_digest
from .plan import Bucket


class CheckpointReader:
    """Keeps one open descriptor per file; counts the bytes it reads."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_range(self, path: str, offset: int, dest: memoryview) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(dest):
            n = os.preadv(fd, [dest[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file at byte {offset + done} (file changed while reading?)")
            done += n
        self.bytes_read += done

    def fill(self, bucket: Bucket, host: torch.Tensor) -> None:
        """Read every tensor of ``bucket`` into ``host`` (a CPU uint8 tensor) at its slot offset."""
        view = memoryview(host.numpy())
        for slot in bucket.slots:
            t = slot.tensor
            self.read_range(t.file, t.file_offset, view[slot.offset : slot.offset + t.nbytes])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


STAGING_CHUNK_BYTES = 32 << 20  # each of the two pinned staging halves (CUDA)


def bucket_digests(bucket: Bucket, host: torch.Tensor) -> list[int]:
    """xxh3 of every tensor's bytes in a filled bucket (``host``: the bucket's bytes in CPU memory)."""
    return [tensor_digest(host[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]


class BucketFiller:
    """Writes buckets into bucket buffers: on CPU straight from the files; on CUDA through two pinned staging
    halves, so that reading the next chunk from disk overlaps the host -> device copy of the last one."""

    def __init__(self, reader: CheckpointReader, device: torch.device, bucket_bytes: int,
                 chunk_bytes: int = STAGING_CHUNK_BYTES, staged: bool | None = None):  # fmt: skip
        """``staged``: go through the staging halves (default: on CUDA only; on CPU it tests the same logic)."""
        self.reader = reader
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self._cuda = device.type == "cuda"
        if self.staged:
            chunk = min(bucket_bytes, chunk_bytes)
            self._halves = [torch.empty(chunk, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(2)]
            if self._cuda:
                self._copied = [torch.cuda.Event() for _ in range(2)]  # the half's last copy to the device is done
                self._stream = torch.cuda.Stream(device)

    def fill(self, bucket: Bucket, buffer: torch.Tensor, digests: bool = False) -> list[int] | None:
        """Fill ``buffer`` with the bucket; returns the tensors' xxh3 digests when asked (computed from host memory
        as the bytes pass). Returns once the bytes are in ``buffer``, on CUDA too: the caller's next step is to
        tell the server, or another rank, to read them."""
        if not self.staged:
            self.reader.fill(bucket, buffer)
            return bucket_digests(bucket, buffer) if digests else None
        hashers = [xxhash.xxh3_64() for _ in bucket.slots] if digests else None
        chunk = self._halves[0].numel()
        half, start, end = 0, None, 0  # the staged span: buffer bytes [start, end) sit in self._halves[half]
        for i, slot in enumerate(bucket.slots):
            t, done = slot.tensor, 0
            while done < t.nbytes:
                pos = slot.offset + done
                if start is not None and pos - start >= chunk:  # the span is full: ship it, stage in the other half
                    self._copy_out(half, buffer, start, end)
                    half, start = 1 - half, None
                if start is None:
                    if self._cuda:
                        self._copied[half].synchronize()  # its previous copy must be done before we overwrite it
                    start = pos
                n = min(chunk - (pos - start), t.nbytes - done)
                dest = memoryview(self._halves[half].numpy())[pos - start : pos - start + n]
                self.reader.read_range(t.file, t.file_offset + done, dest)
                if hashers is not None:
                    hashers[i].update(dest)
                done += n
                end = pos + n
        if start is not None:
            self._copy_out(half, buffer, start, end)
        if self._cuda:
            self._stream.synchronize()
        return [h.intdigest() for h in hashers] if hashers is not None else None

    def _copy_out(self, half: int, buffer: torch.Tensor, start: int, end: int) -> None:
        if not self._cuda:
            buffer[start:end].copy_(self._halves[half][: end - start])
            return
        with torch.cuda.stream(self._stream):
            buffer[start:end].copy_(self._halves[half][: end - start], non_blocking=True)
            self._copied[half].record(self._stream)
