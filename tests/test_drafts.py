"""The models one scheduler process writes (server/drafts.py): which draft parameters the gate waits for, under
which names, and which drafts refuse an update. The writes themselves run against a real SGLang server in
test_e2e_drafts.py."""

import torch
from torch import nn

from sglang_ckpt_plugin.server.drafts import Draft, ModelSet, draft_prefixes


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
    assert models.refusal() is None and models.members() == (target, models.drafts[0].model)


def test_a_draft_with_a_checkpoint_of_its_own_refuses_every_push_and_is_not_waited_for():
    target = Tiny(2)
    models = ModelSet(target, (Draft("draft.", Tiny(1), "/eagle-draft", reads_target_checkpoint=False),))
    assert "loads a checkpoint of its own (/eagle-draft)" in models.refusal()
    assert not any(name.startswith("draft.") for name in models.required())
    assert models.members() == (target,)


def test_a_copy_of_a_shared_parameter_is_the_drafts_own():
    """Shared means the same storage: a draft whose embeddings equal the target's by value but not by memory
    holds its own, written by its own loader."""
    target = Tiny(1)
    draft = Tiny(1)
    with torch.no_grad():
        draft.embed.weight.copy_(target.embed.weight)
    models = ModelSet(target, (Draft("draft.", draft, "/ckpt", True),))
    assert "draft.embed.weight" in models.required()


def test_draft_names_follow_sglangs_weights_checker():
    assert draft_prefixes(1) == ["draft."]
    assert draft_prefixes(2) == ["draft0.", "draft1."]
