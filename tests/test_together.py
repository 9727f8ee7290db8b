"""Unit tests: tensors a model loads only in one call reach it in one call, whatever the buckets."""

import pytest
import torch

from sglang_ckpt_plugin.server.together import GroupsTogether
from sglang_ckpt_plugin.transport.messages import ProtocolError

PAIR = frozenset({"l0.q_a", "l0.kv_a"})


def names(views):
    return [name for name, _ in views]


def test_a_pair_split_across_buckets_is_held_copied_then_loaded_with_its_last_member():
    together = GroupsTogether([PAIR])
    buffer = torch.arange(8.0)
    first = together.arrange([("norm", buffer[:2]), ("l0.kv_a", buffer[2:5])])
    assert names(first) == ["norm"]
    buffer.zero_()  # the loader refills its buffer with the next bucket: the held member must not change
    second = together.arrange([("l0.q_a", torch.ones(3)), ("o", torch.ones(1))])
    assert names(second) == ["o", "l0.kv_a", "l0.q_a"]
    assert dict(second)["l0.kv_a"].tolist() == [2.0, 3.0, 4.0]
    together.check_finished()


def test_a_pair_in_one_bucket_passes_as_it_is_and_other_tensors_are_untouched():
    together = GroupsTogether([PAIR])
    kv, q = torch.ones(2), torch.zeros(2)
    out = together.arrange([("l0.q_a", q), ("x", torch.ones(1)), ("l0.kv_a", kv)])
    assert names(out) == ["x", "l0.kv_a", "l0.q_a"] and dict(out)["l0.kv_a"] is kv  # no copy needed
    assert GroupsTogether([]).arrange(out) is out


def test_a_member_that_never_meets_its_group_fails_the_update_and_a_retry_starts_afresh():
    together = GroupsTogether([PAIR])
    assert together.arrange([("l0.q_a", torch.ones(1))]) == []
    with pytest.raises(ProtocolError, match="never got them.*l0.q_a"):
        together.check_finished()
    together.clear()
    together.check_finished()
