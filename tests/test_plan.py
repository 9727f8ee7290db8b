"""Unit tests: shard planning and bucket packing (pure logic)."""

import pytest

from sglang_ckpt_plugin.loader.checkpoint import TensorInfo
from sglang_ckpt_plugin.loader.plan import (
    ALIGN_BYTES,
    auto_bucket_size,
    global_order,
    parse_ranks,
    plan_buckets,
    plan_world,
    shard_by_bytes,
)


def tensor(name, nbytes, file="f.safetensors", offset=0):
    return TensorInfo(name, "uint8", (nbytes,), file, offset, nbytes)


def test_buckets_respect_size_alignment_and_order():
    ts = [tensor(f"t{i}", n) for i, n in enumerate([100, 300, 50, 700, 10, 999])]
    buckets = plan_buckets(ts, 1024)
    assert [s.tensor.name for b in buckets for s in b.slots] == [t.name for t in ts]
    for b in buckets:
        for s in b.slots:
            assert s.offset % ALIGN_BYTES == 0
            assert s.offset + s.tensor.nbytes <= 1024
        offsets = [s.offset for s in b.slots]
        assert offsets == sorted(offsets)
        ends = [s.offset + s.tensor.nbytes for s in b.slots]
        assert all(e <= o for e, o in zip(ends, offsets[1:])), "slots overlap"
    assert [b.index for b in buckets] == list(range(len(buckets)))


def test_bucket_smaller_than_largest_tensor_is_an_error_with_advice():
    with pytest.raises(ValueError, match="at least 1024"):
        plan_buckets([tensor("big", 1000)], 512)


def test_one_tensor_per_bucket_when_they_only_fit_alone():
    buckets = plan_buckets([tensor("a", 600), tensor("b", 600)], 1000)
    assert len(buckets) == 2


def test_a_bucket_lists_at_most_what_one_bucket_message_may_carry():
    buckets = plan_buckets([tensor(f"t{i}", 10) for i in range(7)], 1 << 20, max_tensors=3)
    assert [len(b.slots) for b in buckets] == [3, 3, 1]
    assert [s.tensor.name for b in buckets for s in b.slots] == [f"t{i}" for i in range(7)]


@pytest.mark.parametrize(
    "requested, kind, free, expected",
    [
        (None, "cuda", 4 << 30, 1 << 30),  # a quarter of the GPU's free memory: the whole update, one exchange
        (None, "cuda", (4 << 30) - 1, 64 << 20),  # more than a quarter: the default buckets
        (None, "cpu", 1 << 40, 64 << 20),  # shared memory stages a buffer per bucket anyway
        ((16 << 20) + 1, "cuda", 1 << 40, (16 << 20) + 256),  # the caller's size (aligned) wins
        (1000, "cpu", 0, 8 << 20),  # never below the largest tensor
    ],
)
def test_local_push_bucket_size(requested, kind, free, expected):
    from sglang_ckpt_plugin.local_push import local_bucket_bytes

    assert local_bucket_bytes(requested, 1 << 30, 8 << 20, kind, free) == expected


def test_auto_bucket_size_bounds():
    mib = 1 << 20
    small = [tensor(f"t{i}", 1000) for i in range(10)]
    assert auto_bucket_size(small) == 16 * mib
    huge = [tensor("e", 900 * mib)] + [tensor(f"t{i}", 64 * mib) for i in range(100)]
    assert auto_bucket_size(huge) >= 900 * mib  # never below the largest tensor
    medium = [tensor(f"t{i}", 8 * mib) for i in range(256)]  # 2 GiB
    assert auto_bucket_size(medium) == 128 * mib
    assert auto_bucket_size(medium, memory_budget=256 * mib) == 32 * mib


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_balanced_within_one_tensor_on_a_skewed_checkpoint(world):
    sizes = [50_000_000] + [1_000_000 + 37 * i for i in range(200)] + [4096] * 50
    ts = [tensor(f"t{i}", n, offset=i) for i, n in enumerate(sizes)]
    shards = shard_by_bytes(ts, world)
    assert sorted(t.name for s in shards for t in s) == sorted(t.name for t in ts)
    loads = [sum(t.nbytes for t in s) for s in shards]
    # ranks without the huge tensor are within one tensor of each other; the huge tensor's rank takes
    # small tensors only while it is not above the others by more than one tensor
    max_small = max(sizes[1:])
    big = next(i for i, s in enumerate(shards) if any(t.nbytes == sizes[0] for t in s))
    others = [load for i, load in enumerate(loads) if i != big] or [loads[big]]
    assert max(others) - min(others) <= max_small
    if loads[big] > sizes[0]:
        assert abs(loads[big] - min(others)) <= max_small
    for s in shards:  # each rank reads in checkpoint order
        idx = [int(t.name[1:]) for t in s]
        assert idx == sorted(idx)


def test_shard_even_split():
    ts = [tensor(f"t{i}", 1000) for i in range(10)]
    loads = [sum(t.nbytes for t in s) for s in shard_by_bytes(ts, 2)]
    assert loads == [5000, 5000]


def test_global_order_round_robins_owners_and_numbers_steps():
    per_owner = [
        plan_buckets([tensor("a0", 100), tensor("a1", 100), tensor("a2", 100)], 256),
        plan_buckets([tensor("b0", 100)], 256),
    ]
    steps = global_order(per_owner)
    assert [(s.seq, s.owner) for s in steps] == [(0, 0), (1, 1), (2, 0), (3, 0)]  # one tensor per bucket
    assert [sl.tensor.name for s in steps for sl in s.bucket.slots] == ["a0", "b0", "a1", "a2"]


def test_plan_world_covers_every_tensor_once_with_one_buffer_size():
    tensors = [tensor(f"w{i}", 1000 * (i + 1)) for i in range(20)] + [tensor("embed", 50_000)]
    shards = shard_by_bytes(tensors, 3)
    steps, buffer_bytes = plan_world(shards, 16_384 * 4)
    names = [sl.tensor.name for s in steps for sl in s.bucket.slots]
    assert sorted(names) == sorted(x.name for x in tensors)
    assert buffer_bytes == max(s.bucket.nbytes for s in steps) >= 50_000
    for s in steps:  # a step's bucket holds only tensors its owner reads
        assert {sl.tensor.name for sl in s.bucket.slots} <= {x.name for x in shards[s.owner]}


@pytest.mark.parametrize(
    "text,world,size,expected",
    [("1", 2, 1, [1]), ("2,3", 4, 2, [2, 3]), ("3, 2", 4, 2, [2, 3])],
)
def test_parse_ranks(text, world, size, expected):
    assert parse_ranks(text, world, size) == expected


@pytest.mark.parametrize(
    "text,message",
    [(None, "needs --ranks"), ("x", "integers"), ("4", "0..3"), ("2", "missing \\[3\\]")],
)
def test_parse_ranks_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ranks(text, 4, 2)
