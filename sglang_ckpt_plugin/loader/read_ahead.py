"""Two phases: each rank reads every bucket it owns into that bucket's own buffer, in a thread of its own, all
ranks at once, while the pipeline moves the buckets already read (a bucket moves as soon as its owner has read
it). Reading from disk then overlaps the exchange between ranks and the servers' checks instead of preceding them:
on several nodes a push takes the time of a node's share of the reads plus one bucket's move, not the sum.

Only this thread uses the rank's ``BucketFiller`` while the stage runs, and each bucket has a buffer of its own,
so the pipeline never reads a buffer being filled: it takes a bucket only once its read has returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .plan import Step


class ReadAhead:
    def __init__(self, reads: list[tuple[Step, object]], read: Callable, on_thread_start: Callable[[], None]):
        """``reads``: (step, the buffer its bucket goes to) in pipeline order; ``read(step, buffer)`` fills it and
        returns (buffer, digests); ``on_thread_start``: what the reading thread needs first (its CUDA device)."""
        self.read_s = 0.0  # time spent reading, in the thread
        self._read = read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-read-ahead", initializer=on_thread_start)
        self._reads: dict[int, Future] = {step.seq: self._pool.submit(self._timed, step, dest) for step, dest in reads}

    def _timed(self, step: Step, dest):
        t0 = time.perf_counter()
        try:
            return self._read(step, dest)
        finally:
            self.read_s += time.perf_counter() - t0

    def __contains__(self, seq: int) -> bool:
        return seq in self._reads

    def take(self, seq: int):
        """(buffer, digests) of step ``seq`` once read; its read's error if it failed."""
        return self._reads[seq].result()

    def close(self) -> None:
        """Reads not begun are dropped; the one in progress ends first (nothing fills a buffer after this)."""
        for read in self._reads.values():
            read.cancel()
        self._pool.shutdown(wait=True)
