"""Unit tests: reading safetensors headers and indexes, with the errors a user gets for bad input."""

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from sglang_ckpt_plugin.loader import reader as reader_module
from sglang_ckpt_plugin.loader.checkpoint import CheckpointError, discover_files, dtype_name, read_checkpoint
from sglang_ckpt_plugin.loader.filler import BucketFiller, bucket_digests
from sglang_ckpt_plugin.loader.plan import plan_buckets
from sglang_ckpt_plugin.loader.reader import CheckpointReader


@pytest.fixture
def ckpt(tmp_path):
    tensors = {
        "a.weight": torch.randn(4, 8, dtype=torch.float32),
        "b.weight": torch.randn(3, dtype=torch.bfloat16),
        "c.ids": torch.arange(5, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def test_read_header_matches_safetensors_and_bytes_round_trip(ckpt):
    path, tensors = ckpt
    infos = read_checkpoint(path)
    assert {t.name: (t.dtype, t.shape) for t in infos} == {
        k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()
    }
    buckets = plan_buckets(infos, 4096)
    buf = torch.zeros(4096, dtype=torch.uint8)
    reader = CheckpointReader()
    reader.fill(buckets[0], buf)
    reader.close()
    for s in buckets[0].slots:
        got = buf[s.offset : s.offset + s.tensor.nbytes].view(getattr(torch, s.tensor.dtype)).view(s.tensor.shape)
        assert torch.equal(got, tensors[s.tensor.name])
    assert reader.bytes_read == sum(v.numel() * v.element_size() for v in tensors.values())


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("checksum", ["xxh3", "wordsum"])
@pytest.mark.parametrize("chunk", [7, 24, 64, 4096], ids=["tensor-split-3-ways", "aligned", "two-tensors", "one-span"])
def test_staged_fill_gives_the_same_bytes_and_digests_as_a_direct_fill(tmp_path, chunk, checksum, chunks):
    """The CUDA path's staging logic (chunks in turn, spans cut at any byte, digests streamed as bytes pass), run on
    the CPU: every chunk size and count gives exactly the direct fill's bytes and digests."""
    tensors = {
        "a": torch.randn(5, 3),
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.randn(9, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    bucket = plan_buckets(read_checkpoint(tmp_path), 4096)[0]
    reader = CheckpointReader()
    direct = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    want = BucketFiller(reader, torch.device("cpu"), bucket.nbytes, checksum=checksum).fill(
        bucket, direct, digests=True
    )
    staged = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    filler = BucketFiller(
        reader, torch.device("cpu"), bucket.nbytes, chunk_bytes=chunk, staged=True, checksum=checksum, chunks=chunks
    )
    got = filler.fill(bucket, staged, digests=True)
    reader.close()
    assert got == want == bucket_digests(bucket, direct, checksum)
    if checksum == "wordsum":  # what the receiver computes on the buffer where it lies
        from sglang_ckpt_plugin.transport.word_sums import device_digest

        assert got == [device_digest(staged[s.offset : s.offset + s.tensor.nbytes]) for s in bucket.slots]
    for s in bucket.slots:
        span = slice(s.offset, s.offset + s.tensor.nbytes)
        assert torch.equal(staged[span], direct[span]), s.tensor.name


@pytest.mark.parametrize("checksum", ["xxh3", "wordsum"])
@pytest.mark.parametrize("chunk", [4096, 12288, 1 << 20], ids=["page-windows", "three-page-windows", "one-window"])
def test_direct_reads_through_the_staging_chunks_give_the_direct_fills_bytes_and_digests(tmp_path, chunk, checksum):
    """A cold bucket on the CUDA path: O_DIRECT windows of the files into aligned staging chunks, then each
    tensor's bytes to its slot (run on the CPU). Tensors cross windows and files; bytes and digests are exactly
    those of a plain fill."""
    from sglang_ckpt_plugin.loader.early_read import drop_cached

    first = {"a": torch.randn(3000), "b": torch.arange(5001, dtype=torch.int16), "c": torch.randn(777).double()}
    save_file(first, tmp_path / "model-1.safetensors")
    save_file({"d": torch.randn(2050), "e": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "model-2.safetensors")
    bucket = plan_buckets(read_checkpoint(tmp_path), 1 << 20)[0]
    assert len({s.tensor.file for s in bucket.slots}) == 2
    reader = CheckpointReader(threads=3)
    plain = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    want = BucketFiller(reader, torch.device("cpu"), bucket.nbytes, checksum=checksum).fill(bucket, plain, digests=True)
    staged = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    filler = BucketFiller(
        reader, torch.device("cpu"), bucket.nbytes, chunk_bytes=chunk, staged=True, checksum=checksum, direct_io="on"
    )
    assert filler.read_mode(bucket) == "direct"
    assert filler.fill(bucket, staged, digests=True) == want
    for s in bucket.slots:
        span = slice(s.offset, s.offset + s.tensor.nbytes)
        assert torch.equal(staged[span], plain[span]), s.tensor.name
    if reader.direct_fd(bucket.slots[0].tensor.file) is not None:  # not on tmpfs, which refuses O_DIRECT
        assert reader.direct_bytes > 0
    # auto: O_DIRECT for what the page cache does not hold, the page cache for what it holds
    auto = BucketFiller(reader, torch.device("cpu"), bucket.nbytes, chunk_bytes=chunk, staged=True, direct_io="auto")
    assert auto.read_mode(bucket) == "buffered"  # just read: cached
    if all(drop_cached(str(f)) == 0 for f in tmp_path.glob("*.safetensors")):
        assert auto.read_mode(bucket) == "direct"
    reader.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_reads_split_over_threads_give_the_same_bytes(tmp_path, monkeypatch, threads):
    """Ranges cut into pieces (here 5 bytes) read by several threads land exactly where one sequential read puts
    them, staged or not; a file shorter than its header says is an error, not a silent short bucket."""
    monkeypatch.setattr(reader_module, "MIN_PIECE_BYTES", 5)
    monkeypatch.setattr(reader_module, "MAX_PIECE_BYTES", 5)
    tensors = {
        "a": torch.randn(5, 3),
        "b": torch.arange(7, dtype=torch.int16),
        "c": torch.randn(9, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    bucket = plan_buckets(read_checkpoint(tmp_path), 4096)[0]
    reader = CheckpointReader(threads=threads)
    for staged in (False, True):
        buf = torch.zeros(bucket.nbytes, dtype=torch.uint8)
        BucketFiller(reader, torch.device("cpu"), bucket.nbytes, chunk_bytes=24, staged=staged).fill(bucket, buf)
        for s in bucket.slots:
            got = buf[s.offset : s.offset + s.tensor.nbytes].view(getattr(torch, s.tensor.dtype)).view(s.tensor.shape)
            assert torch.equal(got, tensors[s.tensor.name]), (staged, s.tensor.name)
    file = tmp_path / "model.safetensors"
    with pytest.raises(OSError, match="unexpected end of file"):
        reader.read_range(str(file), file.stat().st_size - 3, memoryview(bytearray(12)))
    reader.close()


def test_pieces_are_about_two_per_thread_within_bounds():
    MiB = 1 << 20
    assert CheckpointReader(threads=2).piece_bytes(64 * MiB) == 16 * MiB
    assert CheckpointReader(threads=32).piece_bytes(64 * MiB) == 2 * MiB
    assert CheckpointReader(threads=4).piece_bytes(64 * MiB) == 8 * MiB
    assert CheckpointReader(threads=1).piece_bytes(1 << 40) == 16 * MiB


def test_sharded_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "m-1.safetensors")
    save_file({"y": torch.ones(3)}, tmp_path / "m-2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}})
    )
    assert [t.name for t in read_checkpoint(tmp_path)] == ["x", "y"]


def test_missing_path():
    with pytest.raises(CheckpointError, match="does not exist"):
        discover_files("/nonexistent/ckpt")


def test_no_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        discover_files(tmp_path)


def test_index_names_missing_file(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="do not exist"):
        discover_files(tmp_path)


def test_corrupt_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="corrupt header"):
        read_checkpoint(tmp_path)


def test_header_length_beyond_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(tmp_path)


def test_truncated_data(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_duplicate_names_across_files(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="appears in both"):
        read_checkpoint(tmp_path)


def test_read_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv("SGLANG_CKPT_READ_THREADS", "3")
    assert CheckpointReader().threads == 3
    monkeypatch.delenv("SGLANG_CKPT_READ_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # many ranks on this node's cores: at least one thread each
    assert CheckpointReader().threads == 1


def test_read_rate_limit_holds_a_reader_to_its_rate(tmp_path, monkeypatch):
    from sglang_ckpt_plugin.loader import reader as reader_mod

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    monkeypatch.setenv(reader_mod.READ_RATE_ENV, "4M")
    r = reader_mod.CheckpointReader(threads=1)
    dest = bytearray(1 << 20)
    t0 = time.monotonic()
    r.read_range(str(path), 0, memoryview(dest))
    r.close()
    assert time.monotonic() - t0 >= (1 << 20) / 4e6 * 0.95  # 1 MiB at 4 MB/s: about a quarter of a second
    assert bytes(dest) == path.read_bytes()
    monkeypatch.setenv(reader_mod.READ_RATE_ENV, "fast")
    with pytest.raises(ValueError, match="SGLANG_CKPT_READ_RATE"):
        reader_mod.read_rate_limit()


def test_a_direct_read_the_filesystem_refuses_falls_back_to_an_ordinary_read(tmp_path):
    """O_DIRECT needs aligned memory (and a block size the reader's alignment covers); where the kernel says EINVAL
    the file is read through the page cache instead, with the same bytes."""
    import os

    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    reader = CheckpointReader(threads=2)
    unaligned = memoryview(bytearray((1 << 20) + 8192))[1 : 1 + (1 << 20)]
    assert reader.read_direct(str(path), 0, unaligned) == len(data) and bytes(unaligned) == data
    assert reader.direct_bytes == 0 and reader.direct_fd(str(path)) is None
    reader.close()


def test_a_direct_read_into_memory_the_kernel_cannot_pin_falls_back_for_that_window(tmp_path, monkeypatch):
    """EFAULT from an O_DIRECT read: the destination (some vGPU / carve-out allocations) cannot be pinned. That
    window is read through the page cache, with the same bytes; the file keeps O_DIRECT for other memory."""
    import errno
    import os

    from sglang_ckpt_plugin.loader import reader as reader_mod

    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    reader = CheckpointReader(threads=2)
    direct = reader.direct_fd(str(path))
    if direct is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    real = os.preadv

    def unpinnable(fd, buffers, offset):
        if fd == direct:
            raise OSError(errno.EFAULT, "Bad address")
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader_mod.os, "preadv", unpinnable)
    aligned = torch.empty((1 << 20) + 4096, dtype=torch.uint8)
    start = (-aligned.data_ptr()) % 4096
    dest = memoryview(aligned.numpy())[start : start + (1 << 20)]
    assert reader.read_direct(str(path), 0, dest) == len(data) and bytes(dest) == data
    assert reader.direct_bytes == 0 and reader.bytes_read == len(data)
    assert reader.direct_fd(str(path)) == direct  # kept for memory that can be pinned
    reader.close()


def test_pinned_staging_chunks_are_powers_of_two_so_torch_pins_no_more_than_the_budget():
    """torch's host allocator rounds every pinned request up to a power of two: a chunk asked as 64 MiB + 4 KiB
    pinned 128 MiB. Pinned chunks are the largest power of two within the size asked; host chunks (CPU path) keep
    the size asked, with room to align in."""
    from sglang_ckpt_plugin.loader.filler import _staging_chunk, staging_chunk_bytes

    MiB = 1 << 20
    assert staging_chunk_bytes(64 * MiB, pinned=True) == 64 * MiB
    assert staging_chunk_bytes(100 * MiB, pinned=True) == 64 * MiB
    assert staging_chunk_bytes(64 * MiB + 4096, pinned=True) == 64 * MiB
    assert staging_chunk_bytes(100 * MiB, pinned=False) == 100 * MiB
    assert staging_chunk_bytes(3000, pinned=True) == 3000  # smaller than one aligned window: as asked
    chunk = _staging_chunk(5 * MiB + 123, pinned=False)
    assert chunk.numel() == 5 * MiB + 123 and chunk.data_ptr() % 4096 == 0


def test_the_reader_asks_for_no_kernel_read_ahead(tmp_path, monkeypatch):
    """A rank's tensors lie between other ranks' tensors: read-ahead past one's end would read another node's bytes
    from this node's disk (measured by bench/cluster_bench.py: 35% more than the share from a throttled disk). Every
    descriptor the reader opens says so to the kernel, once."""
    import os

    from sglang_ckpt_plugin.loader.reader import CheckpointReader

    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: (advice.append((fd, *a)), real(fd, *a))[1])
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    reader = CheckpointReader(threads=1)
    try:
        fd = reader.fd(str(path))
        assert reader.fd(str(path)) == fd
        assert advice == [(fd, 0, 0, os.POSIX_FADV_RANDOM)]
    finally:
        reader.close()
