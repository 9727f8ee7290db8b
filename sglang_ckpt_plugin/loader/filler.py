"""Fill a bucket buffer: on CPU straight from the files (reader.py); on CUDA through pinned host staging chunks
(three by default), each copied to the device buffer asynchronously while the next ones are read.

A CPU buffer may be a memoryview (a one-process CPU loader never imports torch) or a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..transport.handles import device_kind
from ..transport.integrity import host_checksum, new_hasher
from .plan import Bucket, align_up
from .reader import DIRECT_ALIGN, CheckpointReader, cached_bytes, host_view

if TYPE_CHECKING:
    import torch

STAGING_CHUNK_BYTES = 64 << 20  # each pinned staging chunk (CUDA)
STAGING_CHUNKS = 3  # in flight: one being read while up to two copy to the device
GAP_BYTES = 1 << 20  # tensors this close in one file are read as one extent (the bytes between are read too)


def file_extents(bucket: Bucket) -> list[tuple[str, int, int, list[int]]]:
    """(file, first byte, end, slot indices) of a bucket's tensors, nearby tensors of one file merged."""
    extents: list[tuple[str, int, int, list[int]]] = []

    def where(i: int) -> tuple[str, int]:
        return bucket.slots[i].tensor.file, bucket.slots[i].tensor.file_offset

    for i in sorted(range(len(bucket.slots)), key=where):
        t = bucket.slots[i].tensor
        if extents and extents[-1][0] == t.file and t.file_offset - extents[-1][2] <= GAP_BYTES:
            path, first, end, members = extents[-1]
            extents[-1] = (path, first, max(end, t.file_offset + t.nbytes), members + [i])
        else:
            extents.append((t.file, t.file_offset, t.file_offset + t.nbytes, [i]))
    return extents


def bucket_digests(bucket: Bucket, host: torch.Tensor | memoryview, checksum: str = "xxh3") -> list[int]:
    """The digest of every tensor's bytes in a filled bucket (``host``: the bucket's bytes in CPU memory)."""
    view = host_view(host)
    return [host_checksum(checksum, view[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]


class BucketFiller:
    """Writes buckets into bucket buffers: on CPU straight from the files; on CUDA through pinned staging chunks, so
    that reading the next chunk overlaps the host -> device copies of the last ones."""

    def __init__(
        self,
        reader: CheckpointReader,
        device: torch.device | str | None,
        bucket_bytes: int,
        chunk_bytes: int = STAGING_CHUNK_BYTES,
        staged: bool | None = None,
        checksum: str = "xxh3",
        chunks: int = STAGING_CHUNKS,
        direct_io: str = "auto",
    ):
        """``staged``: go through the staging chunks (default: on CUDA only; on CPU it tests the same logic).
        ``device``: see transport.handles.device_kind. ``checksum``: the digests' kind (transport.integrity).
        ``direct_io`` (staged only): "auto" reads a bucket the page cache does not hold with O_DIRECT straight into
        the staging chunks, "on" every bucket, "off" none."""
        self.reader = reader
        self.checksum = checksum
        self.direct_io = direct_io
        self.device = device
        self._cuda = device_kind(device) == "cuda"
        self.staged = self._cuda if staged is None else staged
        if self.staged:
            import torch

            chunk = staging_chunk_bytes(min(bucket_bytes, chunk_bytes), pinned=self._cuda)
            self._chunks = [_staging_chunk(chunk, pinned=self._cuda) for _ in range(chunks)]
            self._window = chunk // DIRECT_ALIGN * DIRECT_ALIGN  # what one O_DIRECT read may fill
            if self._cuda:
                # each chunk's last copy to the device is done
                self._copied = [torch.cuda.Event() for _ in range(chunks)]
                self._stream = torch.cuda.Stream(device)

    def fill(self, bucket: Bucket, buffer: torch.Tensor | memoryview, digests: bool = False) -> list[int] | None:
        """Fill ``buffer`` with the bucket; returns the tensors' digests when asked (computed from host memory
        as the bytes pass). Returns once the bytes are in ``buffer``, on CUDA too: the caller's next step is to
        tell the server, or another rank, to read them."""
        if not self.staged:
            self.reader.fill(bucket, buffer)
            return bucket_digests(bucket, buffer, self.checksum) if digests else None
        hashers = [new_hasher(self.checksum) for _ in bucket.slots] if digests else None
        if self.read_mode(bucket) == "direct":
            self._fill_direct(bucket, buffer, hashers)
        else:
            self._fill_buffered(bucket, buffer, hashers)
        if self._cuda:
            self._stream.synchronize()
        return [h.intdigest() for h in hashers] if hashers is not None else None

    def read_mode(self, bucket: Bucket) -> str:
        """How a staged bucket is read, decided once: "direct" (O_DIRECT file windows into the staging chunks, then
        each tensor's bytes to its slot) or "buffered" (through the page cache, in the bucket's own layout)."""
        if not self.staged or self.direct_io == "off" or not self._window:
            return "buffered"
        if self.direct_io == "on":
            return "direct"
        extents = file_extents(bucket)
        cached = sum(cached_bytes(self.reader.fd(path), first, end - first) for path, first, end, _ in extents)
        return "direct" if 2 * cached < sum(end - first for _, first, end, _ in extents) else "buffered"

    def _fill_direct(self, bucket: Bucket, buffer: torch.Tensor, hashers: list | None) -> None:
        at = 0
        for path, first, end, members in file_extents(bucket):
            window = first - first % DIRECT_ALIGN
            while window < end:
                n = min(self._window, align_up(end, DIRECT_ALIGN) - window)
                self._wait_free(at)
                view = memoryview(self._chunks[at].numpy())
                got = self.reader.read_direct(path, window, view[:n])
                if window + got < min(window + n, end):
                    raise OSError(f"{path}: unexpected end of file at byte {window + got} (changed while reading?)")
                for i in members:
                    slot = bucket.slots[i]
                    lo = max(slot.tensor.file_offset, window)
                    hi = min(slot.tensor.file_offset + slot.tensor.nbytes, window + n)
                    if lo < hi:
                        if hashers is not None:
                            hashers[i].update(view[lo - window : hi - window])
                        self._copy(at, lo - window, buffer, slot.offset + lo - slot.tensor.file_offset, hi - lo)
                self._mark_used(at)
                at, window = (at + 1) % len(self._chunks), window + n

    def _fill_buffered(self, bucket: Bucket, buffer: torch.Tensor, hashers: list | None) -> None:
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
                    self._wait_free(at)
                    start = pos
                n = min(chunk - (pos - start), t.nbytes - done)
                pending.append(
                    (
                        i,
                        t.file,
                        t.file_offset + done,
                        memoryview(self._chunks[at].numpy())[pos - start : pos - start + n],
                    )
                )
                done += n
                end = pos + n
        if start is not None:
            self._ship(at, buffer, start, end, pending, hashers)

    def _ship(
        self,
        at: int,
        buffer: torch.Tensor,
        start: int,
        end: int,
        pending: list[tuple[int, str, int, memoryview]],
        hashers: list | None,
    ) -> None:
        """Read the span's pieces into chunk ``at`` (all threads at once), digest them in order, copy it out."""
        self.reader.read_ranges([(path, offset, dest) for _, path, offset, dest in pending])
        if hashers is not None:
            for i, _, _, dest in pending:
                hashers[i].update(dest)
        self._copy(at, 0, buffer, start, end - start)
        self._mark_used(at)

    def _wait_free(self, at: int) -> None:
        """Chunk ``at``'s last copies to the device must be done before it is overwritten."""
        if self._cuda:
            self._copied[at].synchronize()

    def _copy(self, at: int, src: int, buffer: torch.Tensor, dst: int, n: int) -> None:
        """``n`` bytes from chunk ``at`` to the buffer (on CUDA: queued on the staging stream)."""
        if not self._cuda:
            buffer[dst : dst + n].copy_(self._chunks[at][src : src + n])
            return
        import torch

        with torch.cuda.stream(self._stream):
            buffer[dst : dst + n].copy_(self._chunks[at][src : src + n], non_blocking=True)

    def _mark_used(self, at: int) -> None:
        if self._cuda:
            self._copied[at].record(self._stream)


def staging_chunk_bytes(wanted: int, pinned: bool) -> int:
    """A staging chunk's size. torch's host allocator pins a power of two for every request (192 MiB of chunks
    asked as chunk + 4 KiB each pinned 384 MiB): a pinned chunk is the largest power of two within ``wanted``,
    so what is pinned is what the staging budget counted."""
    if not pinned or wanted <= DIRECT_ALIGN:
        return wanted
    return 1 << (wanted.bit_length() - 1)


def _staging_chunk(n: int, pinned: bool) -> torch.Tensor:
    """``n`` bytes at a DIRECT_ALIGN boundary. Pinned memory comes page-aligned, so it is asked for as it is (one
    more byte would double what is pinned); other memory gets room to align in."""
    import torch

    if pinned:
        raw = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        if raw.data_ptr() % DIRECT_ALIGN == 0:
            return raw
    return _aligned(torch.empty(n + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pinned), n)


def _aligned(raw: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` bytes of ``raw`` starting at a DIRECT_ALIGN boundary (O_DIRECT reads need aligned memory)."""
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip : skip + n]
