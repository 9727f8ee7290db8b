"""A bench's targets as data: each one measured in the run that prints it, against its bound, with a verdict.

A verdict is PASS or SHORT (with the ratio to the bound), never silence; SHORT does not fail the run (timings on a
shared 2-core machine are noisy: compare the ratios), a wrong result does (bench/alternation.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    promise: str  # what is promised, in words, with the baseline it is measured against
    value: float  # measured in this run
    bound: float
    at_most: bool = True  # value <= bound (False: value >= bound)
    unit: str = "s"

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def row(self) -> str:
        sign = "<=" if self.at_most else ">="
        ratio = f"{self.value / self.bound:.2f}" if self.bound else "-"
        verdict = "PASS" if self.met else "SHORT"
        return (
            f"| {self.promise} | {self.value:.3f} {self.unit} | {sign} {self.bound:.3f} {self.unit} | {ratio} | "
            f"{verdict} |"
        )


def print_verdicts(title: str, targets: list[Target]) -> bool:
    """The table of targets; True when every one is met."""
    print(f"\n| {title}: target | measured | bound | measured / bound | verdict |\n|---|---|---|---|---|")
    for target in targets:
        print(target.row())
    met = sum(t.met for t in targets)
    print(f"{met} of {len(targets)} targets met")
    return met == len(targets)
