"""The model-family matrix (tests/family_matrix.py, one process for every family): for each of 24 families the
plugin's check accepts the full checkpoint and refuses it with one tensor missing, and a push through the real
loader and receiver into a model SGLang built on dummy weights (the plugin loaded, as in a server waiting for its
weights) is bit-identical, every parameter and buffer, to SGLang's own load of the same files into a second
instance. A family SGLang itself cannot load on this CPU is listed with SGLang's error."""

from __future__ import annotations

import pytest

from .family_matrix import FAMILIES, run_matrix

pytestmark = pytest.mark.slow
SGLANG_CANNOT_LOAD = {"phimoe": "No module or parameter named 'model.layers.0.block_sparse_moe'"}  # SGLang 0.5.23


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict]:
    return {r["family"]: r for r in run_matrix("tests.family_matrix", tmp_path_factory.mktemp("matrix"))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family(matrix, family):
    record = matrix[family]
    if family in SGLANG_CANNOT_LOAD:
        assert SGLANG_CANNOT_LOAD[family] in record.get("sglang_error", ""), record  # SGLang's own load fails
        return
    assert "error" not in record and "sglang_error" not in record and "make_error" not in record, record
    assert record["full"] == "accepted", record
    assert record["lacking"].startswith("refused: "), record
    assert record["loader_errors"] == [] and record["buckets"] > 1, record
    assert record["differed_before"] > 0, record  # the push changed what the model held
    assert record["differing_after"] == [], record


def test_the_fused_pair_of_deepseek_v3_is_found_in_every_layer(matrix):
    together = matrix["deepseek-v3"]["together"]
    assert [sorted(p.rsplit(".", 3)[-2] for p in pair) for pair in together] == [["kv_a_proj_with_mqa", "q_a_proj"]] * 2
    # lacking kv_a_proj_with_mqa, its partner q_a_proj is unused: refused
    assert "kv_a_proj_with_mqa" in matrix["deepseek-v3"]["lacks"] and "q_a_proj" in matrix["deepseek-v3"]["lacking"]
