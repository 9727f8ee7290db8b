"""bench/alternation.py: the benches' check that every timed update changed what is served, to exactly the
checkpoint it pushed (pure logic; the servers are a dict of what each one shows)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from alternation import Alternation  # noqa: E402

A, B = "checksum-of-A", "checksum-of-B"


def pair_showing(shown: dict[str, str]) -> Alternation:
    pair = Alternation((Path("a"), Path("b")), observe=lambda url: shown[url])
    pair.reference = {0: A, 1: B}
    pair.served = dict.fromkeys(shown, 0)
    return pair


def test_an_update_that_writes_the_other_checkpoint_passes_and_the_next_one_alternates():
    shown = {"s1": A, "s2": A}
    pair = pair_showing(shown)
    k = pair.next_index(["s1", "s2"])
    assert k == 1
    shown.update(s1=B, s2=B)
    pair.check("push", ["s1", "s2"], k)
    assert pair.mismatches == [] and pair.next_index(["s1", "s2"]) == 0
    assert "PASS" in pair.verdict()


def test_an_update_that_wrote_nothing_fails():
    shown = {"s1": A}
    pair = pair_showing(shown)
    pair.check("a method that wrote nothing", ["s1"], pair.next_index(["s1"]))
    assert pair.mismatches == ["a method that wrote nothing on s1: still serves A, not B"]
    assert pair.verdict().startswith("MISMATCH")


def test_a_half_written_update_or_one_instance_left_behind_fails():
    shown = {"s1": B, "s2": "checksum-of-a-mix"}
    pair = pair_showing(shown)
    pair.check("fleet push", ["s1", "s2"], 1)
    assert len(pair.mismatches) == 1 and "s2" in pair.mismatches[0] and "neither" in pair.mismatches[0]


def test_servers_that_serve_different_checkpoints_have_no_next():
    pair = pair_showing({"s1": A, "s2": B})
    pair.served["s2"] = 1
    with pytest.raises(RuntimeError, match="serve different checkpoints"):
        pair.next_index(["s1", "s2"])
