"""A trainer's tensor names (transformers 5's in-memory names) turned into the checkpoint's for the architectures
transformers renames by class, and for no other (server/trainer_names.py). End to end: test_e2e_vlm.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_ckpt_plugin.server.trainer_names import (
    accept_trainer_names,
    checkpoint_names_for,
    expert_splits_for,
    trainer_form_for,
)
from sglang_ckpt_plugin.server.validate import observe


def config(architecture: str, model_type: str):
    return SimpleNamespace(architectures=[architecture], model_type=model_type)


def test_qwen2_5_vl_trainer_names_become_the_checkpoints_and_checkpoint_names_stay():
    names = checkpoint_names_for(config("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"))
    assert names("model.visual.blocks.0.mlp.gate_proj.weight") == "visual.blocks.0.mlp.gate_proj.weight"
    assert names("model.language_model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert names("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    for as_in_files in ("visual.merger.mlp.0.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert names(as_in_files) == as_in_files


def test_gemma3_trainer_names_become_the_released_ones():
    names = checkpoint_names_for(config("Gemma3ForConditionalGeneration", "gemma3"))
    assert (
        names("model.language_model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert names("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert (
        names("model.vision_tower.vision_model.post_layernorm.weight")
        == "vision_tower.vision_model.post_layernorm.weight"
    )
    assert (
        names("model.multi_modal_projector.mm_input_projection_weight")
        == "multi_modal_projector.mm_input_projection_weight"
    )
    for released in ("language_model.model.norm.weight", "vision_tower.vision_model.post_layernorm.bias"):
        assert names(released) == released


def test_families_transformers_renames_only_by_model_type_are_left_alone():
    # reversed, these would rename the checkpoints' own names (Qwen3.5 text, Kimi-Linear's dense mlp, Mixtral)
    for architecture, model_type in [
        ("Qwen3_5ForCausalLM", "qwen3_5_text"),
        ("KimiLinearForCausalLM", "kimi_linear"),
        ("MixtralForCausalLM", "mixtral"),
        ("LlamaForCausalLM", "llama"),
        ("Qwen3VLForConditionalGeneration", "qwen3_vl"),  # SGLang's own loader maps its names
    ]:
        assert checkpoint_names_for(config(architecture, model_type)) is None, architecture


class Model(torch.nn.Module):
    def __init__(self, architecture: str):
        super().__init__()
        self.config = config(architecture, "")
        self.seen: list[str] = []

    def load_weights(self, weights):
        self.seen.extend(name for name, _ in weights)


def test_the_wrapped_load_weights_sees_checkpoint_names_and_survives_an_observed_load():
    model = Model("Qwen2_5_VLForConditionalGeneration")
    assert accept_trainer_names(model) is not None
    trainer = iter([("model.visual.patch_embed.proj.weight", torch.zeros(1)), ("lm_head.weight", torch.zeros(1))])
    model.load_weights(trainer)  # a lazy iterator, as SGLang's disk loader hands it
    assert model.seen == ["visual.patch_embed.proj.weight", "lm_head.weight"]
    with observe(model, check=lambda entries: None):
        model.load_weights([("model.language_model.norm.weight", torch.zeros(1))])
    model.load_weights([("model.language_model.norm.weight", torch.zeros(1))])  # still renamed after it
    assert model.seen[2:] == ["model.norm.weight", "model.norm.weight"]
    plain = Model("LlamaForCausalLM")
    assert accept_trainer_names(plain) is None and "load_weights" not in plain.__dict__


def test_stacked_experts_split_into_the_checkpoints_per_expert_views():
    """Qwen3-MoE as transformers 5 holds it: gate and up of every expert in one [experts, 2 x inter, hidden] tensor,
    down in one [experts, hidden, inter]; split as its converter stacked them, without a copy."""
    form = trainer_form_for(config("Qwen3MoeForCausalLM", "qwen3_moe"))
    experts, inter, hidden = 3, 2, 4
    gate_up = torch.arange(experts * 2 * inter * hidden, dtype=torch.float32).reshape(experts, 2 * inter, hidden)
    down = torch.arange(experts * hidden * inter, dtype=torch.float32).reshape(experts, hidden, inter)
    router = torch.zeros(experts, hidden)
    held = [
        ("model.layers.1.mlp.experts.gate_up_proj", gate_up),
        ("model.layers.1.mlp.experts.down_proj", down),
        ("model.layers.1.mlp.gate.weight", router),
        ("model.layers.2.mlp.experts.0.up_proj.weight", router[0]),  # already the checkpoint's: unchanged
    ]
    out = dict(form.to_checkpoint(held))
    prefix = "model.layers.1.mlp.experts"
    assert list(out)[:3] == [
        f"{prefix}.0.gate_proj.weight",
        f"{prefix}.0.up_proj.weight",
        f"{prefix}.1.gate_proj.weight",
    ]
    for e in range(experts):
        assert torch.equal(out[f"{prefix}.{e}.gate_proj.weight"], gate_up[e, :inter])
        assert torch.equal(out[f"{prefix}.{e}.down_proj.weight"], down[e])
        assert out[f"{prefix}.{e}.up_proj.weight"].data_ptr() == gate_up[e, inter:].data_ptr()  # a view
    assert torch.equal(out["model.layers.2.mlp.experts.0.up_proj.weight"], router[0])
    assert "model.layers.1.mlp.gate.weight" in out and len(out) == 3 * experts + 2


def test_only_converters_that_stack_experts_are_followed():
    kinds = {mt: [s.fused for s in expert_splits_for(config("", mt))] for mt in ("qwen3_moe", "mixtral", "llama")}
    assert kinds == {
        "qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "mixtral": [".experts.gate_up_proj", ".experts.down_proj"],  # its .mlp. renaming is not reversed: refused
        "llama": [],
    }
    # Qwen3-VL-MoE's files hold its experts stacked already (transformers transposes them): the name is the same in
    # both forms, so turning it around would break a push of the files
    assert expert_splits_for(config("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe")) == ()
    assert trainer_form_for(config("LlamaForCausalLM", "llama")) is None


def test_a_model_with_stacked_experts_gets_per_expert_tensors_in_every_load():
    model = Model("Qwen3MoeForCausalLM")
    model.config.model_type = "qwen3_moe"
    assert accept_trainer_names(model) is not None
    model.load_weights(iter([("model.layers.0.mlp.experts.down_proj", torch.zeros(2, 4, 3))]))
    assert model.seen == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(2)]
