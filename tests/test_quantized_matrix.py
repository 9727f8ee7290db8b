"""The quantized rows of the family matrix (tests/quantized_matrix.py, one process): block-FP8 Qwen3, Qwen3-MoE and
DeepSeek-V3, and a bfloat16 Qwen3 quantized online (``--quantization fp8``), started on dummy weights and
post-processed as a waiting server is, then pushed A, B, A: after each push every parameter, buffer and derived
tensor is bit-identical to SGLang's own fresh load of those files, the served parameters keep their storage, and an
update writing part of a quantized module is refused before anything is written."""

from __future__ import annotations

import pytest

from .family_matrix import run_matrix
from .quantized_matrix import ROWS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict]:
    return {r["row"]: r for r in run_matrix("tests.quantized_matrix", tmp_path_factory.mktemp("quantized"))}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_pushes_a_b_a_are_bit_identical_to_sglangs_fresh_load(matrix, row):
    record = matrix[row]
    assert "error" not in record, record.get("error")
    assert record["quantized_modules"] > 0, record  # the model was quantized, and its modules recorded
    for step in ("push0", "push1", "push2"):
        push = record[step]
        assert push["loader_errors"] == [] and push["buckets"] > 1, record
        assert push["differed_before"] > 0, record  # each push changed what the model held
        assert push["differing_after"] == [], record
        # module by module: a module is post-processed once its last tensor arrived (its layer's file read), not
        # after the whole update
        assert 0 < push["most_restored_at_once"] < record["quantized_modules"], record
    assert record["addresses_kept"], record  # post-processed results copied into the served storage
    assert record["lacking"].startswith("refused"), record


@pytest.mark.parametrize("row", ["fp8-qwen3", "fp8-qwen3-moe", "online-fp8-qwen3"])
def test_a_partial_update_writing_part_of_a_quantized_module_is_refused(matrix, row):
    refusal = matrix[row]["part_module"]
    assert refusal.startswith("refused (part-module): the update writes part of 1 quantized module(s)"), refusal
    assert "model.layers.0.self_attn.qkv_proj (leaves model.layers.0.self_attn.qkv_proj.weight" in refusal


@pytest.mark.parametrize("row", sorted(ROWS))
def test_a_failed_or_part_module_load_leaves_every_quantized_module_as_served(matrix, row):
    """A trainer session that wrote part of a quantized module names it and leaves it as served; a load that raises
    after it began puts the served objects back with their bytes."""
    assert matrix[row]["failed_loads"] == {
        "session_named_the_part_module": True,
        "session_left_it_as_served": True,
        "failed_load_left_it_as_served": True,
    }
