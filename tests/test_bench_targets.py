"""bench/targets.py: every bench target prints a verdict, PASS or SHORT with the ratio to its bound."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from targets import Target, print_verdicts  # noqa: E402


def test_a_bound_on_either_side_gives_pass_or_short_with_the_ratio():
    assert Target("pause / disk reload's", 1.2, 1.5, unit="x").row().endswith("| 0.80 | PASS |")
    assert Target("pause / disk reload's", 1.8, 1.5, unit="x").row().endswith("| 1.20 | SHORT |")
    assert Target("2 ranks / 1 rank", 1.9, 1.7, at_most=False, unit="x").met
    assert not Target("2 ranks / 1 rank", 0.7, 1.7, at_most=False, unit="x").met
    assert Target("bytes between loader processes", 0.0, 0.0, unit="MB").row().endswith("| - | PASS |")


def test_the_table_counts_what_was_met(capsys):
    assert not print_verdicts("t", [Target("a", 0.1, 1.0), Target("b", 2.0, 1.0)])
    out = capsys.readouterr().out
    assert "| a | 0.100 s | <= 1.000 s | 0.10 | PASS |" in out and "1 of 2 targets met" in out
