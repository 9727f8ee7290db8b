"""The model-family matrix (tests/family_matrix.py, one process for every family): for each of 30 families the
plugin's check accepts the full checkpoint and refuses it with one tensor missing, and a push through the real
loader and receiver into a model SGLang built on dummy weights (the plugin loaded, as in a server waiting for its
weights) is bit-identical, every parameter and buffer, to SGLang's own load of the same files into a second
instance. For the hybrid families, one linear-attention or Mamba mixer of a second checkpoint pushed as a partial
update ends exact and changes nothing else. For the families whose experts transformers 5 stacks, the tensors as a
trainer holds them load as SGLang loads the files, or are refused by name. A family SGLang itself cannot load on
this CPU is listed with SGLang's error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .family_configs import FAMILIES, LINEAR_MIXER
from .family_matrix import run_matrix

pytestmark = pytest.mark.slow
SGLANG_CANNOT_LOAD = {  # SGLang 0.5.23 on this CPU
    "phimoe": "No module or parameter named 'model.layers.0.block_sparse_moe'",
    "qwen3-next": "Found no NVIDIA driver",  # its Gated DeltaNet allocates on the current CUDA device
}


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


@pytest.mark.parametrize("family", sorted(set(LINEAR_MIXER) - set(SGLANG_CANNOT_LOAD)))
def test_a_partial_update_of_one_linear_attention_mixer_is_exact(matrix, family):
    partial = matrix[family]["partial"]
    assert partial["loader_errors"] == [], partial
    transformed = {"falcon-h1": ".mamba.A", "nemotron-h": ".mixer.A"}.get(family, "A_log")
    assert any(name.endswith(transformed) for name in partial["written"]), partial  # the in-place-transformed one
    assert partial["written_differs_from_second"] == [], partial  # counted written: holds the second checkpoint's
    assert partial["others_differ_from_first"] == [], partial  # the rest: untouched


TRAINER_STACKED_EXPERTS = ["deepseek-v2", "deepseek-v3", "glm4-moe", "olmoe", "qwen2-moe", "qwen3-moe", "qwen3.5-moe"]


@pytest.mark.parametrize("family", TRAINER_STACKED_EXPERTS)
def test_experts_as_a_transformers_trainer_stacks_them_load_as_sglang_loads_the_files(matrix, family):
    """transformers 5 holds each MoE layer's experts as one tensor per projection; pushed as held, they are split
    into the checkpoint's per-expert tensors (server/trainer_names.py) and the model ends equal to SGLang's load."""
    form = matrix[family]["trainer_form"]
    assert form["stacked"] and form["loader_errors"] == [] and form["differed_before"] > 0, form
    assert form["differing_after"] == [], form


@pytest.mark.parametrize("family", ["mixtral", "kimi-linear"])
def test_stacked_experts_whose_names_transformers_also_changes_are_refused_by_name(matrix, family):
    """Mixtral's and Kimi-Linear's trainers hold ``mlp.*`` where the files have ``block_sparse_moe.*``: renamings
    by model type are not reversed (they would rename other families' own names), so the push is refused naming a
    tensor the trainer sent, before anything is written."""
    assert "is not a weight of this model" in matrix[family]["trainer_form"]["refused"], matrix[family]
    assert ".mlp." in matrix[family]["trainer_form"]["refused"], matrix[family]


def test_falcon_h1s_unloaded_q_k_norms_are_still_read_nowhere():
    """The plugin lets an update leave out Falcon-H1's q_norm / k_norm (sglang_compat._BUILT_NEVER_READ) because
    SGLang builds them and never calls them: fails when a new SGLang starts to."""
    source = (Path(importlib.util.find_spec("sglang").origin).parent / "srt/models/falcon_h1.py").read_text()
    assert "self.q_norm = " in source and "self.k_norm = " in source
    assert "self.q_norm(" not in source and "self.k_norm(" not in source


def test_the_readme_counts_the_families_of_the_matrix():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"a matrix of {len(FAMILIES)} " in readme
