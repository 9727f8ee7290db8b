"""Tiny block-FP8 checkpoints, as DeepSeek-V3/R1 and Kimi-K2 ship theirs, made from a float checkpoint.

    python -m sglang_ckpt_plugin.demo.tiny_quantized SRC_DIR OUT_DIR

Every linear projection's ``weight`` becomes ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` beside it, one
scale per 128x128 block (``scale = amax / 448``); embeddings, norms, ``lm_head``, MoE routers and DeepSeek's MTP
``eh_proj`` stay as they were; ``config.json`` gets the ``quantization_config`` SGLang reads. Sizes should be
multiples of 128 (``quantizable_sizes``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

BLOCK = [128, 128]
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": BLOCK,
}
_PROJECTION = re.compile(r"(_proj|_a_proj_with_mqa)\.weight$")
_KEPT = re.compile(r"(^|\.)(eh_proj|shared_head)\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

# Sizes of the float models these are made from (tiny_model.make_tiny_model overrides): every dimension a linear
# has is a multiple of 128, so each weight is whole 128x128 blocks per tensor-parallel rank at TP=2.
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128)
_MLA = dict(q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
QUANTIZABLE_SIZES = {
    "qwen3": dict(hidden=256, overrides=dict(intermediate_size=512, **_ATTENTION)),
    "qwen3_moe": dict(hidden=256, overrides=dict(**_ATTENTION)),
    "deepseek_v3": dict(hidden=256, overrides=dict(intermediate_size=512, num_attention_heads=4, **_MLA)),
}


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and bool(_PROJECTION.search(name)) and not _KEPT.search(name)


def quantize_block_fp8(weight: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv ``[ceil(N/bn), ceil(K/bk)]``) with ``weight ~= fp8 * scale`` per block."""
    bn, bk = block
    n, k = weight.shape
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    blocks = padded.view(rows, bn, cols, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    quantized = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bn, cols * bk)[:n, :k]
    return quantized.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write ``out``: ``src``'s files, its projections in block FP8, one safetensors file per decoder layer (and one
    for the rest) with an index, as the large FP8 checkpoints are laid out."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            layer = _LAYER.match(name)
            shard = by_file.setdefault(f"layer-{int(layer.group(1)):03d}" if layer else "other", {})
            if is_quantized(name, tensor):
                shard[name], shard[name.removesuffix("weight") + "weight_scale_inv"] = quantize_block_fp8(tensor)
            else:
                shard[name] = tensor
    weight_map = {}
    for i, (_, tensors) in enumerate(sorted(by_file.items())):
        filename = f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors"
        save_file(tensors, out / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
    for other in src.iterdir():
        if other.suffix != ".safetensors" and other.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(other, out / other.name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_tiny_fp8_model(out_dir: str | Path, arch: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny float model of ``arch`` (sizes from QUANTIZABLE_SIZES), then its block-FP8 twin in ``out_dir``."""
    from .tiny_model import make_tiny_model, model_config

    out = Path(out_dir)
    sizes = QUANTIZABLE_SIZES[arch]
    config = model_config(arch, sizes["hidden"], 2, 1000, dtype, False, **sizes["overrides"])
    float_dir = make_tiny_model(out.with_name(out.name + "-float"), arch, seed=seed, dtype=dtype, config=config)
    return quantize_checkpoint(float_dir, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_dir")
    p.add_argument("out_dir")
    a = p.parse_args()
    print(quantize_checkpoint(a.src_dir, a.out_dir))


if __name__ == "__main__":
    main()
