"""Pipeline stages as the first stage reports them (one report for the whole model), and the tensors a stage leaves
to the others. The end-to-end path runs in test_e2e_pipeline.py."""

from __future__ import annotations

import torch

from sglang_ckpt_plugin.server import pipeline
from sglang_ckpt_plugin.server import sglang_compat as sg


def _rank(state: str, missing: list[str], fingerprint: str | None = "f", covers: bool = True) -> dict:
    last = {"outcome": "success", "covers_model": covers, "message": "loaded"}
    placement = {"rank_keys": ["cpu-pp0-tp0", "cpu-pp1-tp0"], "pp_size": 2}
    return {
        "state": state,
        "missing": missing,
        "missing_count": len(missing),
        "fingerprint": fingerprint,
        "session_open": False,
        "last_update": last,
        "placement": placement,
        "staging": {"state": "committed"},
    }


def test_the_whole_model_is_complete_only_when_every_stage_is():
    both = pipeline.merge_stage_reports([_rank("complete", []), _rank("complete", [])], stages=2)
    assert (both["state"], both["missing_count"], both["fingerprint"]) == ("complete", 0, "f")
    assert both["last_update"]["covers_model"] and both["placement"]["rank_keys"] == ["cpu-pp0-tp0", "cpu-pp1-tp0"]
    # the second stage was never written: the first stage's completeness does not open the gate
    waiting = pipeline.merge_stage_reports([_rank("complete", []), _rank("waiting", ["lm_head.weight"])], stages=2)
    assert (waiting["state"], waiting["missing"], waiting["fingerprint"]) == ("waiting", ["lm_head.weight"], None)
    mixed = pipeline.merge_stage_reports([_rank("incomplete", ["a"]), _rank("waiting", ["b"])], stages=2)
    assert mixed["state"] == "incomplete" and mixed["missing_count"] == 2
    # each stage's fingerprint names what it holds: two different ones are no fingerprint of the model
    apart = pipeline.merge_stage_reports([_rank("complete", [], "f"), _rank("complete", [], "g")], stages=2)
    assert apart["state"] == "complete" and apart["fingerprint"] is None
    partial = pipeline.merge_stage_reports([_rank("complete", []), _rank("complete", [], covers=False)], stages=2)
    assert partial["last_update"]["covers_model"] is False  # replicas agree again only after a whole update


def test_each_stage_speaks_for_its_tp_ranks():
    """World-rank order: stage 0's TP ranks, then stage 1's; within a stage the ranks agreed on one outcome."""
    ranks = [_rank("complete", []), _rank("complete", []), _rank("waiting", ["x"]), _rank("waiting", ["x"])]
    merged = pipeline.merge_stage_reports(ranks, stages=2)
    assert merged["missing"] == ["x"] and merged["missing_count"] == 1


def test_a_tensor_of_a_module_another_stage_holds_is_that_stages():
    from sglang.srt.layers.utils import PPMissingLayer

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(4, 2)
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), PPMissingLayer()])
    model.lm_head = PPMissingLayer()
    assert sg.held_by_another_stage(model, "model.layers.1.self_attn.q_proj.weight")  # fused on load, same module
    assert sg.held_by_another_stage(model, "lm_head.weight")
    assert not sg.held_by_another_stage(model, "model.layers.0.weight")
    assert not sg.held_by_another_stage(model, "model.embed_tokens.weight")
    assert not sg.held_by_another_stage(model, "model.layers.7.mlp.weight")  # no such module: not another stage's
