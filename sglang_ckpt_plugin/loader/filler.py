"""Fill a bucket buffer: on CPU straight from the files (reader.py); on CUDA through pinned host staging chunks
(three by default), each copied to the device buffer asynchronously while the next ones are read.

A CPU buffer may be a memoryview (a one-process CPU loader never imports torch) or a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..transport.handles import device_kind
from ..transport.integrity import host_checksum, new_hasher
from .plan import Bucket
from .reader import CheckpointReader, host_view

if TYPE_CHECKING:
    import torch

STAGING_CHUNK_BYTES = 64 << 20  # each pinned staging chunk (CUDA)
STAGING_CHUNKS = 3  # in flight: one being read while up to two copy to the device


def bucket_digests(bucket: Bucket, host: torch.Tensor | memoryview, checksum: str = "xxh3") -> list[int]:
    """The digest of every tensor's bytes in a filled bucket (``host``: the bucket's bytes in CPU memory)."""
    view = host_view(host)
    return [host_checksum(checksum, view[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]


class BucketFiller:
    """Writes buckets into bucket buffers: on CPU straight from the files; on CUDA through pinned staging chunks, so
    that reading the next chunk overlaps the host -> device copies of the last ones."""

    def __init__(self, reader: CheckpointReader, device: torch.device | str | None, bucket_bytes: int,
                 chunk_bytes: int = STAGING_CHUNK_BYTES, staged: bool | None = None, checksum: str = "xxh3",
                 chunks: int = STAGING_CHUNKS):  # fmt: skip
        """``staged``: go through the staging chunks (default: on CUDA only; on CPU it tests the same logic).
        ``device``: see transport.handles.device_kind. ``checksum``: the digests' kind (transport.integrity)."""
        self.reader = reader
        self.checksum = checksum
        self.device = device
        self._cuda = device_kind(device) == "cuda"
        self.staged = self._cuda if staged is None else staged
        if self.staged:
            import torch

            chunk = min(bucket_bytes, chunk_bytes)
            self._chunks = [torch.empty(chunk, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(chunks)]
            if self._cuda:
                self._copied = [torch.cuda.Event() for _ in range(chunks)]  # the chunk's last copy to the device is done
                self._stream = torch.cuda.Stream(device)

    def fill(self, bucket: Bucket, buffer: torch.Tensor | memoryview, digests: bool = False) -> list[int] | None:
        """Fill ``buffer`` with the bucket; returns the tensors' digests when asked (computed from host memory
        as the bytes pass). Returns once the bytes are in ``buffer``, on CUDA too: the caller's next step is to
        tell the server, or another rank, to read them."""
        if not self.staged:
            self.reader.fill(bucket, buffer)
            return bucket_digests(bucket, buffer, self.checksum) if digests else None
        hashers = [new_hasher(self.checksum) for _ in bucket.slots] if digests else None
        chunk = self._chunks[0].numel()
        at, start, end = 0, None, 0  # the staged span: buffer bytes [start, end) sit in self._chunks[at]
        pending: list[tuple[int, str, int, memoryview]] = []  # (slot index, file, offset, dest) of the span
        for i, slot in enumerate(bucket.slots):
            t, done = slot.tensor, 0
            while done < t.nbytes:
                pos = slot.offset + done
                if start is not None and pos - start >= chunk:  # the span is full: ship it, stage in the next chunk
                    self._ship(at, buffer, start, end, pending, hashers)
                    at, start, pending = (at + 1) % len(self._chunks), None, []
                if start is None:
                    if self._cuda:
                        self._copied[at].synchronize()  # its previous copy must be done before we overwrite it
                    start = pos
                n = min(chunk - (pos - start), t.nbytes - done)
                pending.append((i, t.file, t.file_offset + done,
                                memoryview(self._chunks[at].numpy())[pos - start : pos - start + n]))  # fmt: skip
                done += n
                end = pos + n
        if start is not None:
            self._ship(at, buffer, start, end, pending, hashers)
        if self._cuda:
            self._stream.synchronize()
        return [h.intdigest() for h in hashers] if hashers is not None else None

    def _ship(self, at: int, buffer: torch.Tensor, start: int, end: int,
              pending: list[tuple[int, str, int, memoryview]], hashers: list | None) -> None:  # fmt: skip
        """Read the span's pieces into chunk ``at`` (all threads at once), digest them in order, copy it out."""
        self.reader.read_ranges([(path, offset, dest) for _, path, offset, dest in pending])
        if hashers is not None:
            for i, _, _, dest in pending:
                hashers[i].update(dest)
        self._copy_out(at, buffer, start, end)

    def _copy_out(self, at: int, buffer: torch.Tensor, start: int, end: int) -> None:
        if not self._cuda:
            buffer[start:end].copy_(self._chunks[at][: end - start])
            return
        import torch

        with torch.cuda.stream(self._stream):
            buffer[start:end].copy_(self._chunks[at][: end - start], non_blocking=True)
            self._copied[at].record(self._stream)
