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

ARCHS = ("llama", "qwen3", "mistral", "qwen3_moe", "mixtral")
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
        architectures=[{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]],
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen3_moe":  # every layer sparse: experts fused into one w13/w2 parameter per layer in SGLang
        return Qwen3MoeConfig(head_dim=16, num_experts=MOE_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=hidden,
                              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **common)  # fmt: skip
    if arch == "mixtral":
        return MixtralConfig(sliding_window=None, num_local_experts=MOE_EXPERTS, num_experts_per_tok=2, **common)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


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
) -> Path:
    """Write config, random weights (safetensors, sharded with an index if ``max_shard_size``) and tokenizer."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(arch, hidden, layers, vocab, dtype, tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(WEIGHT_SCALE)
            elif "norm" in name:  # make norms non-trivial so a wrong norm weight changes the output
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    word_tokenizer(vocab).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "bos_token_id": 1, "eos_token_id": 2}))
    return out


def hf_greedy(model_dir: str | Path, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation (token ids only) on the weights in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
        )  # fmt: skip
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
    make_tiny_model(a.out_dir, a.arch, a.seed, a.hidden, a.layers, a.vocab, getattr(torch, a.dtype),
                    max_shard_size=a.max_shard_size)  # fmt: skip
    print(a.out_dir)


if __name__ == "__main__":
    main()
