"""Two checkpoints of one shape (A and B: different random weights), updated in turn, so that every update a bench
times changes what is served: a method that wrote nothing leaves the other checkpoint's greedy output and fails the
bench, instead of passing with a fast time.

The reference for each is SGLang itself: what a server shows after SGLang's own ``/update_weights_from_disk`` of
that checkpoint (``record``): its greedy output, or its ``/weights_checker`` checksum. A bench asks
``next_index()`` which checkpoint to write next, updates with it, then ``check``s every server it updated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from baselines import time_disk_update

from sglang_ckpt_plugin.demo.launch import generate_ids

PROMPT = list(range(10, 20))
NEW_TOKENS = 8


def greedy(url: str) -> list[int]:
    return generate_ids(url, PROMPT, NEW_TOKENS)["output_ids"]


@dataclass
class Alternation:
    paths: tuple[Path, Path]
    tensors: tuple[dict, dict] | None = None  # each checkpoint's tensors in private memory, for in-memory methods
    observe: Callable[[str], object] = greedy  # what a server shows of its weights: greedy output, or a checksum
    reference: dict[int, object] = field(default_factory=dict)  # index -> what it shows after SGLang's reload
    served: dict[str, int] = field(default_factory=dict)  # url -> index of the checkpoint it serves now
    mismatches: list[str] = field(default_factory=list)

    def record(self, urls: list[str]) -> None:
        """SGLang's own reload of B, then of A, on the first of ``urls`` (servers of one layout): the references;
        then SGLang's reload of A on the others, so that all of them serve A."""
        for index in (1, 0):
            time_disk_update(urls[0], self.paths[index], f"reference-{'AB'[index]}")
            self.reference[index] = self.observe(urls[0])
        if self.reference[0] == self.reference[1]:
            raise RuntimeError("A and B look the same to the check: the bench could not tell a write from none")
        for url in urls[1:]:
            time_disk_update(url, self.paths[0], "reference-A")
        for url in urls:
            self.served[url] = 0

    def next_index(self, urls: list[str]) -> int:
        """The checkpoint none of ``urls`` serves now (they serve one together)."""
        now = {self.served[url] for url in urls}
        if len(now) != 1:
            raise RuntimeError(f"{urls} serve different checkpoints: {now}")
        return 1 - now.pop()

    def path(self, index: int) -> Path:
        return self.paths[index]

    def check(self, method: str, urls: list[str], index: int) -> None:
        """Every url serves checkpoint ``index`` after ``method``: it shows what SGLang's reload of it showed."""
        for url in urls:
            got = self.observe(url)
            if got == self.reference[1 - index]:
                self.mismatches.append(f"{method} on {url}: still serves {'AB'[1 - index]}, not {'AB'[index]}")
            elif got != self.reference[index]:
                self.mismatches.append(f"{method} on {url}: {got} matches neither checkpoint after SGLang's reload")
            self.served[url] = index

    def verdict(self) -> str:
        if not self.mismatches:
            return "every update changed what was served, to exactly the checkpoint SGLang's own reload serves: PASS"
        return "MISMATCH:\n  " + "\n  ".join(self.mismatches)
