"""Make small random HF checkpoints (safetensors + a word-level tokenizer) locally; no hub access needed.

    python -m sglang_ckpt_plugin.demo.tiny_model OUT_DIR [--arch llama|qwen3] [--seed N] [--hidden 64] ...

Random weights are scaled up so greedy decoding has clear winners (flat logits would tie-break on noise).
float32 by default: in bf16, SGLang's CPU kernels and HF round differently and greedy decoding of random
weights can part ways on a near-tie, for the same weights (seen with SGLang's own disk load too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ARCHS = ("llama", "qwen3", "mistral", "qwen3_moe", "mixtral", "deepseek_v3", "gemma2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
MOE_EXPERTS = 4  # the MoE archs: experts per layer (2 of them routed per token)
WEIGHT_SCALE = 4.0


def model_config(arch: str, hidden: int, layers: int, vocab: int, dtype: torch.dtype, tie: bool, **overrides):
    """An HF config for a small model of ``arch``; ``overrides`` replace any of the derived sizes."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 16, 2),
        num_key_value_heads=max(hidden // 32, 1),
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
        architectures=[ARCHITECTURES[arch]],
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": 16, **common})
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen3_moe":  # every layer sparse: experts fused into one w13/w2 parameter per layer in SGLang
        moe = dict(head_dim=16, num_experts=MOE_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=hidden)
        return Qwen3MoeConfig(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **{**moe, **common})
    if arch == "mixtral":
        return MixtralConfig(sliding_window=None, num_local_experts=MOE_EXPERTS, num_experts_per_tok=2, **common)
    if arch == "deepseek_v3":
        return deepseek_v3_config(common)
    if arch == "gemma2":
        from transformers import Gemma2Config

        # SGLang reads hidden_act (transformers' config names it hidden_activation); a window the prompt crosses;
        # embeddings tied, as in every Gemma-2 checkpoint (SGLang's Gemma2 always ties them)
        return Gemma2Config(
            head_dim=16,
            hidden_act="gelu_pytorch_tanh",
            sliding_window=8,
            query_pre_attn_scalar=16,
            **{**common, "tie_word_embeddings": True},
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def deepseek_v3_config(common: dict):
    """DeepSeek-V3's architecture (V3, R1, Kimi-K2) in small: q-LoRA (``q_a_proj`` + ``kv_a_proj_with_mqa``, which
    SGLang fuses), MLA, a dense first layer then MoE layers with a shared expert, ``noaux_tc`` sigmoid routing,
    yarn rope, one multi-token-prediction layer in the checkpoint (``mtp_tensors``; the served model skips it)."""
    from transformers import DeepseekV3Config

    hidden = common["hidden_size"]
    defaults = dict(
        q_lora_rank=hidden // 2,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=MOE_EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        moe_layer_freq=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        num_nextn_predict_layers=1,
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
    fields = {**defaults, **common, "num_key_value_heads": common["num_attention_heads"]}
    return DeepseekV3Config(**fields)


def mtp_tensors(config, dtype: torch.dtype, saved: Path) -> dict[str, torch.Tensor]:
    """What a DeepSeek-V3 checkpoint adds after its last decoder layer for multi-token prediction, by their real
    names: a whole decoder layer (MLA, MoE; shaped as the last layer in the ``saved`` checkpoint) plus its
    projections and norms. SGLang's target model skips them; its NextN draft model (``--speculative-algorithm
    NEXTN``) loads them, with the target's embeddings and lm_head."""
    from safetensors import safe_open

    layer, hidden = config.num_hidden_layers, config.hidden_size
    last, prefix = f"model.layers.{layer - 1}.", f"model.layers.{layer}."
    shapes = {}
    for file in sorted(saved.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes.update({n[len(last) :]: f.get_slice(n).get_shape() for n in f.keys() if n.startswith(last)})
    shapes.update({"eh_proj.weight": [hidden, 2 * hidden], **{f"{n}.weight": [hidden] for n in MTP_NORMS}})
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) >= 2:
            t = torch.randn(shape) * (WEIGHT_SCALE / shape[-1] ** 0.5)
        else:
            t = torch.rand(shape) + 0.5 if "norm" in name else torch.zeros(shape)
        tensors[prefix + name] = t.to(dtype).contiguous()
    return tensors


MTP_NORMS = ("enorm", "hnorm", "shared_head.norm")


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def vary_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights that tell checkpoints apart in the output: matrices scaled up, norms made non-trivial (a wrong
    norm weight then changes the output)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(WEIGHT_SCALE)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 1000,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    config=None,
) -> Path:
    """Write config, random weights (safetensors, sharded with an index if ``max_shard_size``) and tokenizer.
    ``config``: an HF config to use instead of ``arch``'s (its sizes then come from it)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or model_config(arch, hidden, layers, vocab, dtype, tie_word_embeddings)
    torch.manual_seed(seed)
    model = vary_weights(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    if getattr(config, "num_nextn_predict_layers", 0):
        from safetensors.torch import save_file

        mtp = mtp_tensors(config, dtype, out)
        save_file(mtp, out / "mtp.safetensors", metadata={"format": "pt"})
        _add_to_index(out, "mtp.safetensors", mtp)
    word_tokenizer(config.vocab_size).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "bos_token_id": 1, "eos_token_id": 2}))
    return out


def _add_to_index(out: Path, filename: str, tensors: dict) -> None:
    """List extra tensors in the checkpoint's index (written when there is none: SGLang then reads only it)."""
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    index["weight_map"].update({k: filename for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))


def hf_greedy(model_dir: str | Path, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation (token ids only) on the weights in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
        )
    return out[0, len(input_ids) :].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--max-shard-size", default=None, help="e.g. 200MB: write shards plus an index")
    a = p.parse_args()
    make_tiny_model(
        a.out_dir, a.arch, a.seed, a.hidden, a.layers, a.vocab, getattr(torch, a.dtype), max_shard_size=a.max_shard_size
    )
    print(a.out_dir)


if __name__ == "__main__":
    main()
