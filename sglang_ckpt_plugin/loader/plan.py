"""Pure planning: which loader rank reads which tensors, and how tensors pack into buckets.

No I/O here, so everything is unit-tested directly.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..transport.messages import MAX_BUCKET_TENSORS, MAX_BUFFERS
from .checkpoint import TensorInfo

# Tensor offsets inside a bucket are aligned so every dtype view is aligned (and CUDA copies are fast).
ALIGN_BYTES = 256
MiB = 1 << 20
MIN_AUTO_BUCKET = 16 * MiB
MAX_AUTO_BUCKET = 512 * MiB


def align_up(n: int, align: int = ALIGN_BYTES) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Slot:
    tensor: TensorInfo
    offset: int  # byte offset inside the bucket buffer


@dataclass
class Bucket:
    index: int
    slots: list[Slot] = field(default_factory=list)
    nbytes: int = 0  # aligned end of the last slot

    @property
    def payload_bytes(self) -> int:
        return sum(s.tensor.nbytes for s in self.slots)


def shard_by_bytes(tensors: list[TensorInfo], world_size: int) -> list[list[TensorInfo]]:
    """Split tensors across ranks so that bytes per rank are even to within one tensor's size.

    Largest-first greedy onto the least-loaded rank. Each rank's list keeps checkpoint order so that its
    reads stay sequential within a file.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    order = {t.name: i for i, t in enumerate(tensors)}
    heap = [(0, rank) for rank in range(world_size)]
    shards: list[list[TensorInfo]] = [[] for _ in range(world_size)]
    for t in sorted(tensors, key=lambda t: t.nbytes, reverse=True):
        load, rank = heapq.heappop(heap)
        shards[rank].append(t)
        heapq.heappush(heap, (load + t.nbytes, rank))
    return [sorted(s, key=lambda t: order[t.name]) for s in shards]


def auto_bucket_size(tensors: list[TensorInfo], memory_budget: int | None = None) -> int:
    """About 1/16 of the checkpoint, clamped to [16 MiB, 512 MiB] and to an eighth of the memory budget.

    Small enough that two buffers overlap reading with loading many times over, large enough that the
    per-bucket round trip (a few ms) stays negligible. Never smaller than the largest tensor.
    """
    total = sum(t.nbytes for t in tensors)
    size = min(max(total // 16, MIN_AUTO_BUCKET), MAX_AUTO_BUCKET)
    if memory_budget:
        size = min(size, memory_budget // 8)
    return align_up(max(size, max(t.nbytes for t in tensors)))


def plan_buckets(tensors: list[TensorInfo], bucket_size: int, max_tensors: int = MAX_BUCKET_TENSORS) -> list[Bucket]:
    """Pack tensors, in order, into buckets of at most ``bucket_size`` bytes (256-byte aligned slots) and at most
    ``max_tensors`` tensors (what one bucket message may list)."""
    largest = max((t.nbytes for t in tensors), default=0)
    if largest > bucket_size:
        raise ValueError(
            f"bucket size {bucket_size} bytes is smaller than the largest tensor ({largest} bytes); "
            f"use --bucket-size of at least {align_up(largest)} or leave it on auto"
        )
    buckets: list[Bucket] = []
    current = Bucket(index=0)
    for t in tensors:
        if current.slots and (current.nbytes + t.nbytes > bucket_size or len(current.slots) == max_tensors):
            buckets.append(current)
            current = Bucket(index=len(buckets))
        current.slots.append(Slot(t, current.nbytes))
        current.nbytes = align_up(current.nbytes + t.nbytes)
    if current.slots:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class Step:
    """One bucket in the order every loader rank walks: ``owner`` reads it, then sends it to the receivers."""

    seq: int
    owner: int
    bucket: Bucket


def global_order(buckets_per_owner: list[list[Bucket]]) -> list[Step]:
    """Round-robin over owners (bucket 0 of every rank, then bucket 1...), so reading moves from rank to rank."""
    steps: list[Step] = []
    depth = max((len(b) for b in buckets_per_owner), default=0)
    for i in range(depth):
        for owner, buckets in enumerate(buckets_per_owner):
            if i < len(buckets):
                steps.append(Step(len(steps), owner, buckets[i]))
    return steps


def plan_world(
    shards: list[list[TensorInfo]], bucket_size: int | None = None, memory_budget: int | None = None
) -> tuple[list[Step], int]:
    """Buckets of every owner's shard, in global order, and the buffer size they need (same on every rank).

    ``memory_budget``: bytes the loader may use (auto bucket size stays within an eighth of it); every rank
    must pass the same value, so it comes from rank 0.
    """
    tensors = [t for shard in shards for t in shard]
    if not tensors:
        raise ValueError("the checkpoint has no tensors")
    size = align_up(bucket_size) if bucket_size else auto_bucket_size(tensors, memory_budget)
    steps = global_order([plan_buckets(shard, size) for shard in shards])
    return steps, max(s.bucket.nbytes for s in steps)


def parse_ranks(text: str | None, world_size: int, parallel_size: int) -> list[int]:
    """``--ranks 2,3`` -> [2, 3]: the loader ranks whose inference ranks receive a p2p update.

    Whole instances only: a half-updated instance would serve mixed weights.
    """
    if not text:
        raise ValueError("--update-method p2p needs --ranks (the loader ranks of the instances to update, e.g. 1)")
    try:
        ranks = sorted({int(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"--ranks {text!r}: expected comma-separated integers") from None
    if not ranks or ranks[0] < 0 or ranks[-1] >= world_size:
        raise ValueError(f"--ranks {text!r}: ranks must be in 0..{world_size - 1}")
    for r in ranks:
        first = r - r % parallel_size
        missing = [x for x in range(first, first + parallel_size) if x not in ranks]
        if missing:
            raise ValueError(
                f"--ranks {text!r}: rank {r} belongs to an instance of {parallel_size} ranks; "
                f"list all of them (missing {missing})"
            )
    return ranks


def mappable(tensors: list[TensorInfo]) -> bool:
    """Page-cache mode needs every tensor at an offset its dtype can be viewed at (safetensors pads to 8)."""
    return all(t.file_offset % t.itemsize == 0 for t in tensors)


def plan_file_buckets(tensors: list[TensorInfo], bucket_size: int) -> tuple[list[str], list[tuple[int, Bucket]]]:
    """Page-cache mode: (files, [(file index, bucket)]). A bucket never spans two files and its slot offsets
    are the tensors' offsets in their file, so the server reads them straight from the mapped file."""
    files = list(dict.fromkeys(t.file for t in tensors))
    out: list[tuple[int, Bucket]] = []
    for index, path in enumerate(files):
        current = Bucket(index=len(out))
        for t in sorted((t for t in tensors if t.file == path), key=lambda t: t.file_offset):
            if current.slots and current.payload_bytes + t.nbytes > bucket_size:
                out.append((index, current))
                current = Bucket(index=len(out))
            current.slots.append(Slot(t, t.file_offset))
            current.nbytes = max(current.nbytes, t.file_offset + t.nbytes)
        if current.slots:
            out.append((index, current))
    return files, out


STAGING_SHARE = 0.8  # default staging budget: this share of the node's available memory


def staging_budget(given: int, available: int) -> int:
    """Bytes staged buckets may take on a node: ``--staging-budget`` when given (non-zero), else STAGING_SHARE of
    ``available`` (MemAvailable, the least of the loader ranks')."""
    return given or int(available * STAGING_SHARE)


def staging_problem(bucket_bytes: list[int], local_ranks: int, budget: int, kind: str) -> str | None:
    """Why an update with these buckets cannot be staged, or None. Each receiving rank holds every bucket at once
    (one buffer per bucket), and ``local_ranks`` ranks of a node do so side by side in its shared memory."""
    if kind == "cuda":
        return "staging uses host memory: pass --device cpu to stage for a GPU server (its commit copies to the GPU)"
    if len(bucket_bytes) > MAX_BUFFERS:
        return (
            f"{len(bucket_bytes)} buckets, one buffer each, exceed the {MAX_BUFFERS} one update can hand over; "
            "raise --bucket-size"
        )
    need = sum(bucket_bytes) * local_ranks
    if need > budget:
        return (
            f"staging needs {need / 1e9:.2f} GB of shared memory on this node, over the staging budget of "
            f"{budget / 1e9:.2f} GB (--staging-budget)"
        )
    return None
