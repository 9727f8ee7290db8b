"""The models one scheduler process writes (server/drafts.py): which draft parameters the gate waits for, under
which names, which tensors of an update each model is handed, and what an update must carry. The writes themselves
run against real SGLang servers in test_e2e_drafts.py."""

import pytest
import torch
from torch import nn

from sglang_ckpt_plugin.server.drafts import Draft, ModelSet, draft_prefixes
from sglang_ckpt_plugin.server.validate import UpdateRejected


class Tiny(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(layers))
        self.head = nn.Linear(4, 10, bias=False)


def nextn_beside(target: Tiny) -> Tiny:
    """A draft that serves with the target's embeddings and head, as SGLang's ``set_embed_and_head`` makes it."""
    draft = Tiny(1)
    del draft.embed.weight, draft.head.weight
    draft.embed.weight, draft.head.weight = target.embed.weight, target.head.weight
    return draft


def test_the_gate_waits_for_a_drafts_own_parameters_not_those_it_shares_with_the_target():
    target = Tiny(2)
    models = ModelSet(target, (Draft("draft.", nextn_beside(target), "/ckpt", reads_target_checkpoint=True),))
    required = models.required()
    assert sorted(required) == sorted(
        ["embed.weight", "layers.0.weight", "layers.1.weight", "head.weight", "draft.layers.0.weight"]
    )
    assert required["draft.layers.0.weight"] == required["layers.0.weight"]  # byte extents of the same shape
    assert sorted(models.everything_of(models.drafts[0].model)) == ["draft.layers.0.weight"]
    assert sorted(models.everything_of(target)) == ["embed.weight", "head.weight", "layers.0.weight", "layers.1.weight"]
    assert models.written_by({}) == (target, models.drafts[0].model)  # written by every update


def test_a_copy_of_a_shared_parameter_is_the_drafts_own():
    """Shared means the same storage: a draft whose embeddings equal the target's by value but not by memory
    holds its own, written by its own loader."""
    target, draft = Tiny(1), Tiny(1)
    with torch.no_grad():
        draft.embed.weight.copy_(target.embed.weight)
    assert "draft.embed.weight" in ModelSet(target, (Draft("draft.", draft, "/ckpt", True),)).required()


def test_each_model_is_handed_its_own_tensors_of_an_update():
    """A draft that reads the target's checkpoint takes the target's tensors; one with its own checkpoint takes the
    update's draft.* tensors, the prefix stripped, and the target never sees them."""
    target = Tiny(2)
    names = ["layers.0.weight", "model.layers.2.eh_proj.weight", "draft.layers.0.weight"]
    own = ModelSet(target, (Draft("draft.", Tiny(1), "/eagle", reads_target_checkpoint=False),))
    assert [n for n in names if own.targets_name(n)] == names[:2]
    assert own.part_for(own.drafts[0], names) == [("draft.layers.0.weight", "layers.0.weight")]
    nextn = ModelSet(target, (Draft("draft.", Tiny(1), "/same", reads_target_checkpoint=True),))
    assert nextn.part_for(nextn.drafts[0], names[:2]) == [(n, n) for n in names[:2]]
    # the gate counts a draft with its own checkpoint nowhere (SGLang's own paths cannot be measured on it), and
    # it is prepared and post-processed only by an update that carries it
    assert not any(name.startswith("draft.") for name in own.required())
    assert own.written_by({"layers.0.weight": ()}) == (target,)
    assert own.written_by({"draft.layers.0.weight": ()}) == (target, own.drafts[0].model)


def test_a_complete_update_must_carry_a_drafts_own_checkpoint_and_nothing_for_a_draft_the_server_lacks():
    target = Tiny(2)
    own = ModelSet(target, (Draft("draft.", Tiny(1), "/eagle", reads_target_checkpoint=False),))
    target_only = [("layers.0.weight", "float32", [4, 4])]
    with pytest.raises(UpdateRejected, match=r"checkpoint of its own \(/eagle\).*--draft-checkpoint-path DIR"):
        own.check(target_only, partial=False, allow_unused=False)
    with pytest.raises(UpdateRejected, match="serves no draft model with a checkpoint of its own"):
        ModelSet(target).check([*target_only, ("draft.layers.0.weight", "float32", [4, 4])], False, False)


def test_draft_names_follow_sglangs_weights_checker():
    assert draft_prefixes(1) == ["draft."]
    assert draft_prefixes(2) == ["draft0.", "draft1."]
