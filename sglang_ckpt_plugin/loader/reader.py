"""Fill a bucket buffer with checkpoint bytes: ``preadv`` straight from the file into the buffer.

One copy (page cache -> bucket), no whole-file mmap in the loader's resident memory. On CUDA the bytes
land in a pinned host staging buffer first and are copied to the device buffer asynchronously.
"""

from __future__ import annotations

import os

import torch

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


class BucketFiller:
    """Writes buckets into shared buffers, for CPU (direct) or CUDA (pinned staging + async H2D copy)."""

    def __init__(self, reader: CheckpointReader, device: torch.device, bucket_bytes: int):
        self.reader = reader
        self.device = device
        self._staging = None
        if device.type == "cuda":
            self._staging = torch.empty(bucket_bytes, dtype=torch.uint8, pin_memory=True)
            self._stream = torch.cuda.Stream(device)

    def fill(self, bucket: Bucket, buffer: torch.Tensor) -> torch.Tensor:
        """Fill ``buffer``; returns the host tensor holding the bytes (the buffer itself on CPU)."""
        if self._staging is None:
            self.reader.fill(bucket, buffer)
            return buffer
        self.reader.fill(bucket, self._staging)
        with torch.cuda.stream(self._stream):
            buffer[: bucket.nbytes].copy_(self._staging[: bucket.nbytes], non_blocking=True)
        # The staging buffer is refilled next, and the receiver reads the device buffer on its own stream.
        self._stream.synchronize()
        return self._staging
