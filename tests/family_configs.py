"""The tiny checkpoints of the model-family matrix: each family's HF config (common tiny sizes plus its own fields)
and the checkpoint made from it, its config.json as the released checkpoints write it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB = 64, 2, 256
HEADS, KV_HEADS = 4, 2
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    moe_layer_freq=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    rope_scaling={
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 1.0,
        "original_max_position_embeddings": 2048,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)

GATED_DELTA_NET = dict(
    head_dim=16,
    layer_types=["linear_attention", "full_attention"],
    full_attention_interval=2,  # SGLang's Qwen3-Next / Qwen3.5 configs read it (the released ones carry it)
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)

# family -> (HF model_type, config fields beyond the common sizes)
FAMILIES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3-moe": ("qwen3_moe", {"head_dim": 16, **MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {"n_inner": 2 * HIDDEN, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": ("olmo2", {}),
    "olmoe": ("olmoe", {"num_key_value_heads": HEADS, "num_experts": 4, "num_experts_per_tok": 2}),
    "starcoder2": ("starcoder2", {"use_bias": True}),
    "granite": ("granite", {}),
    "stablelm": ("stablelm", {}),
    "smollm3": ("smollm3", {}),
    "glm4": ("glm4", {"head_dim": 16}),
    "glm4-moe": (
        "glm4_moe",
        {
            "head_dim": 16,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "qwen2-moe": (
        "qwen2_moe",
        {**MOE, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": []},
    ),
    "phimoe": ("phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "gpt-oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8}),
    "deepseek-v2": (
        "deepseek_v2",
        {**MLA, "q_lora_rank": None, "num_key_value_heads": HEADS, "scoring_func": "softmax", "topk_method": "greedy"},
    ),
    "deepseek-v3": (
        "deepseek_v3",
        {
            **MLA,
            "q_lora_rank": 32,
            "num_key_value_heads": HEADS,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 1,
        },
    ),
    # Hybrid families: linear attention (Gated DeltaNet, KDA) or Mamba-2 beside full attention. Their loaders
    # transform what they load (Mamba's A_log -> -exp(A_log), written into ``A``; fused input projections).
    "qwen3-next": ("qwen3_next", {**GATED_DELTA_NET, **MOE, "shared_expert_intermediate_size": 32}),
    "qwen3.5": ("qwen3_5_text", GATED_DELTA_NET),
    "qwen3.5-moe": ("qwen3_5_moe_text", {**GATED_DELTA_NET, **MOE, "shared_expert_intermediate_size": 32}),
    "nemotron-h": (
        "nemotron_h",
        {
            "head_dim": 16,
            "layers_block_type": ["mamba", "attention"],
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "conv_kernel": 4,
            "expand": 1,
        },
    ),
    "falcon-h1": (
        "falcon_h1",
        {
            "head_dim": 16,
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_n_groups": 1,
            "mamba_d_state": 16,
            "mamba_d_conv": 4,
            "mamba_expand": 1,
        },
    ),
    "kimi-linear": (
        "kimi_linear",
        {
            **{k: MLA[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
            **MOE,
            "head_dim": 16,
            "linear_attn_config": {
                "kda_layers": [1],  # 1-based: layer 0 is KDA, layer 1 full (MLA) attention
                "full_attn_layers": [2],
                "num_heads": 4,
                "head_dim": 16,
                "short_conv_kernel_size": 4,
            },
            "num_shared_experts": 1,
            # every layer sparse: transformers 5 saves a dense layer's MLP as ``block_sparse_moe.*_proj`` where the
            # released checkpoints and SGLang name it ``mlp.*`` (SGLang's own load raises KeyError on it)
            "first_k_dense_replace": 0,
            "moe_layer_freq": 1,
        },
    ),
}
# The checkpoint prefix of one linear-attention (or Mamba) mixer per hybrid family: pushed alone, from a second
# checkpoint, as a partial update (its in-place-transformed parameters must end exact, or be refused).
LINEAR_MIXER = {
    "qwen3-next": "model.layers.0.linear_attn.",
    "qwen3.5": "model.layers.0.linear_attn.",
    "qwen3.5-moe": "model.layers.0.linear_attn.",
    "nemotron-h": "backbone.layers.0.mixer.",
    "falcon-h1": "model.layers.0.mamba.",
    "kimi-linear": "model.layers.0.self_attn.",
}


def hf_config(family: str):
    from transformers import AutoConfig

    model_type, fields = FAMILIES[family]
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=torch.float32,
    )
    return AutoConfig.for_model(model_type, **{**common, **fields})


# transformers 5 writes NemotronH's layer kinds with its own words; the released configs (and SGLang 0.5.23) use
# ``hybrid_override_pattern`` letters
_NEMOTRON_H_PATTERN = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-"}


def make_checkpoint(out: Path, family: str, seed: int) -> Path:
    """The family's tiny checkpoint, its config.json as the released checkpoints write it."""
    from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

    checkpoint = make_tiny_model(out, family, seed=seed, config=hf_config(family))
    if family == "nemotron-h":
        path = checkpoint / "config.json"
        config = json.loads(path.read_text())
        kinds = config.pop("layers_block_type")
        config.pop("mtp_layers_block_type", None)
        config["hybrid_override_pattern"] = "".join(_NEMOTRON_H_PATTERN[kind] for kind in kinds)
        path.write_text(json.dumps(config, indent=2))
    return checkpoint
