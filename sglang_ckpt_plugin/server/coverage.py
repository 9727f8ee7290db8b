"""What an update writes, byte by byte, and what is still unwritten: pure interval arithmetic, no model.

Coverage of a parameter is a tuple of merged, sorted ``(start, end)`` byte ranges relative to the parameter's
first byte. The dry run (validate.py) turns every write a ``weight_loader`` makes into such ranges from the
geometry of the view it lands on (offset, sizes, strides), whatever the layer: a stacked q/k/v shard is a row
block, one expert's w1 half of a fused MoE ``w13_weight`` is a block inside that expert, padding rows filled with
zeros are written too. A parameter is written when its ranges are exactly ``((0, nbytes),)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

Intervals = tuple[tuple[int, int], ...]
Coverage = dict  # parameter name -> Intervals (bytes written, relative to the parameter)
MAX_RUNS_PER_WRITE = 1 << 22  # a write scattered over more runs than this is not measured (see view_runs)
MISSING_RANGES_LISTED = 4


class Extent(NamedTuple):
    """A parameter's size, for coverage: its bytes, and its first dimension (how messages name what is missing)."""

    nbytes: int
    rows: int


def extent_of(shape, itemsize: int) -> Extent:
    shape = tuple(shape)
    return Extent(math.prod(shape) * itemsize, shape[0] if shape else 1)


def whole(extent: Extent) -> Intervals:
    return ((0, extent.nbytes),) if extent.nbytes else ()


def merge(starts: np.ndarray, ends: np.ndarray) -> Intervals:
    """Sorted, non-overlapping, non-touching ranges covering exactly the union of ``[starts[i], ends[i])``."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return ()
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # a new range begins where a start lies beyond every end before it
    begins = np.ones(starts.size, dtype=bool)
    begins[1:] = starts[1:] > ends[:-1]
    first = np.flatnonzero(begins)
    last = np.append(first[1:] - 1, starts.size - 1)
    return tuple(zip(starts[first].tolist(), ends[last].tolist()))


def union(*coverages: Intervals) -> Intervals:
    pairs = [pair for cov in coverages for pair in cov]
    if not pairs:
        return ()
    arr = np.asarray(pairs, dtype=np.int64)
    return merge(arr[:, 0], arr[:, 1])


def union_coverage(a: Coverage, b: Coverage) -> Coverage:
    out = dict(a)
    for pname, cov in b.items():
        out[pname] = union(out.get(pname, ()), cov)
    return out


def view_runs(offset: int, sizes, strides, itemsize: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Byte ranges ``(starts, ends)`` that a strided view writes (``offset`` and ``strides`` in elements), or None
    when the view scatters over more than MAX_RUNS_PER_WRITE runs. The innermost dimensions that are contiguous
    become one run; the others are enumerated."""
    dims = [(int(n), int(s)) for n, s in zip(sizes, strides) if n != 1]
    if any(n == 0 for n, _ in dims):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    dims.sort(key=lambda d: abs(d[1]), reverse=True)
    run, expect = 1, 1  # elements per contiguous run, and the stride the next dimension needs to extend it
    while dims and dims[-1][1] == expect:
        n, _ = dims.pop()
        run *= n
        expect *= n
    if math.prod(n for n, _ in dims) > MAX_RUNS_PER_WRITE:
        return None
    starts = np.array([offset], dtype=np.int64)
    for n, s in dims:
        starts = (starts[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    starts *= itemsize
    return starts, starts + run * itemsize


def clip(starts: np.ndarray, ends: np.ndarray, nbytes: int) -> Intervals:
    return merge(np.clip(starts, 0, nbytes), np.clip(ends, 0, nbytes))


def written_bytes(coverage: Coverage) -> int:
    """Bytes an update writes into the parameters (a TP rank's own slice of every tensor it loads)."""
    return sum(end - start for cov in coverage.values() for start, end in cov)


def is_whole(cov: Intervals, extent: Extent) -> bool:
    return cov == whole(extent)


def missing_from(required: dict[str, Extent], covered: Coverage) -> list[str]:
    """Each parameter that ``covered`` does not write entirely, with what of it is unwritten."""
    out = []
    for pname, extent in required.items():
        have = covered.get(pname, ())
        if not is_whole(have, extent):
            out.append(pname if not have else f"{pname} ({describe_unwritten(have, extent)})")
    return out


def gaps(have: Intervals, nbytes: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for start, end in have:
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < nbytes:
        out.append((pos, nbytes))
    return out


def describe_unwritten(have: Intervals, extent: Extent) -> str:
    """E.g. ``unwritten: dim-0 index 1-3, part of 0`` (for a fused MoE weight, dim 0 is the expert)."""
    row = extent.nbytes // max(extent.rows, 1)
    if not row:
        return "unwritten: part of it"
    whole_rows, part_rows = [], set()
    for start, end in gaps(have, extent.nbytes):
        lo, hi = -(-start // row), end // row  # rows entirely inside the gap
        if lo < hi:
            whole_rows.append((lo, hi - 1))
        if start % row:
            part_rows.add(start // row)
        if end % row:
            part_rows.add(end // row)
    parts = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in whole_rows[:MISSING_RANGES_LISTED]]
    if len(whole_rows) > MISSING_RANGES_LISTED:
        parts.append(f"and {len(whole_rows) - MISSING_RANGES_LISTED} more ranges")
    text = f"unwritten: dim-0 index {', '.join(parts)} of {extent.rows}" if whole_rows else "unwritten:"
    if part_rows:
        listed = sorted(part_rows)[:MISSING_RANGES_LISTED]
        text += f"{',' if whole_rows else ''} part of dim-0 index {', '.join(map(str, listed))}"
        text += " ..." if len(part_rows) > MISSING_RANGES_LISTED else ""
    return text
