"""The ``sgl_kernel`` CPU ops SGLang's quantized CPU path calls, in plain torch, for a CPU without AMX.

SGLang 0.5.23 serves FP8 on CPU only through these ops (``torch.ops.sgl_kernel.*``), which the real package builds
for AMX machines only. Registered by the CPU environment's plugin (cpu_support/plugin.py), so a server started
with or without the weight-update hooks computes with the same functions:

- ``convert_weight_packed``: the real VNNI permutation (each block of 32 output rows ``[n, K]`` becomes
  ``[K/2, n, 2]``), never an identity, so a weight written row-major into packed storage (a stale layout) serves
  wrong and shows;
- ``fp8_scaled_mm_cpu`` (block scales), ``fp8_per_tensor_scaled_mm_cpu``, ``fused_experts_cpu`` (FP8 weights,
  block scales) and ``shared_expert_cpu`` (DeepSeek's shared expert, FP8 or bf16): unpack, dequantize, multiply in
  float32. Each is a pure function of the bytes it is given: a fresh load and a reload that leave the same bytes
  give the same output. They are slow (a dequantized copy per call): tiny test models only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VNNI_ROWS = 32  # output rows per packed block
VNNI_PAIR = 2  # consecutive input elements kept together

_library: torch.library.Library | None = None

SCHEMAS = {
    "convert_weight_packed": "(Tensor weight) -> Tensor",
    "fp8_scaled_mm_cpu": (
        "(Tensor mat1, Tensor mat2, Tensor scales2, int[] block_size, Tensor? bias, ScalarType out_dtype, "
        "bool is_vnni) -> Tensor"
    ),
    "fp8_per_tensor_scaled_mm_cpu": (
        "(Tensor mat1, Tensor mat2, Tensor scales2, Tensor? bias, ScalarType out_dtype, bool is_vnni) -> Tensor"
    ),
    "fused_experts_cpu": (
        "(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, bool inplace, "
        "int quant_method, Tensor? w1_scale, Tensor? w2_scale, Tensor? w1_zp, Tensor? w2_zp, int[]? block_size, "
        "Tensor? w1_bias, Tensor? w2_bias, float? alpha, float? limit, bool is_vnni, str activation) -> Tensor"
    ),
    "shared_expert_cpu": (
        "(Tensor hidden_states, Tensor w1, Tensor w2, Tensor fused_experts_out, float routed_scaling_factor, "
        "bool inplace, bool use_int8_w8a8, bool use_fp8_w8a16, Tensor? w1_scale, Tensor? w2_scale, int[]? block_size, "
        "bool is_vnni) -> Tensor"
    ),
}
FP8_W8A16 = 2  # SGLang's CPUQuantMethod.FP8_W8A16
UNQUANT = 0


# ---------------------------------------------------------------- the VNNI layout
def _blocks(rows: int):
    for start in range(0, rows, VNNI_ROWS):
        yield start, min(start + VNNI_ROWS, rows)


def _as_bytes(weight: torch.Tensor) -> torch.Tensor:
    """FP8 has no permute kernels everywhere: move it as bytes."""
    return weight.view(torch.uint8) if weight.dtype.itemsize == 1 else weight


def pack_vnni(weight: torch.Tensor) -> torch.Tensor:
    """``[..., N, K]`` -> same shape, each block of up to 32 rows stored as ``[K/2, n, 2]``."""
    if weight.shape[-1] % VNNI_PAIR:
        raise ValueError(f"convert_weight_packed: K={weight.shape[-1]} is not a multiple of {VNNI_PAIR}")
    src = _as_bytes(weight.contiguous())
    out = torch.empty_like(src)
    k = src.shape[-1]
    for start, end in _blocks(src.shape[-2]):
        n = end - start
        block = src[..., start:end, :].reshape(*src.shape[:-2], n, k // VNNI_PAIR, VNNI_PAIR)
        out[..., start:end, :] = block.transpose(-3, -2).reshape(*src.shape[:-2], n, k)
    return out.view(weight.dtype)


def unpack_vnni(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_vnni``."""
    src = _as_bytes(packed.contiguous())
    out = torch.empty_like(src)
    k = src.shape[-1]
    for start, end in _blocks(src.shape[-2]):
        n = end - start
        block = src[..., start:end, :].reshape(*src.shape[:-2], k // VNNI_PAIR, n, VNNI_PAIR)
        out[..., start:end, :] = block.transpose(-3, -2).reshape(*src.shape[:-2], n, k)
    return out.view(packed.dtype)


# ---------------------------------------------------------------- dequantization
def dequantize_block(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """float32 ``weight * scale`` with one scale per ``block_size = [bn, bk]`` block (the last blocks may be cut)."""
    bn, bk = int(block_size[0]), int(block_size[1])
    n, k = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return weight.float() * scale


def _weight(packed: torch.Tensor, is_vnni: bool) -> torch.Tensor:
    return unpack_vnni(packed) if is_vnni else packed


def fp8_scaled_mm_cpu(mat1, mat2, scales2, block_size, bias, out_dtype, is_vnni):
    weight = dequantize_block(_weight(mat2, is_vnni), scales2, block_size)
    out = F.linear(mat1.float(), weight, None if bias is None else bias.float())
    return out.to(out_dtype)


def fp8_per_tensor_scaled_mm_cpu(mat1, mat2, scales2, bias, out_dtype, is_vnni):
    weight = _weight(mat2, is_vnni).float() * scales2.float().reshape(-1)[0]
    out = F.linear(mat1.reshape(-1, mat1.shape[-1]).float(), weight, None if bias is None else bias.float())
    return out.to(out_dtype)


def _expert_weight(packed, scale, block_size, quantized: bool, is_vnni: bool) -> torch.Tensor:
    weight = _weight(packed, is_vnni)
    if not quantized:
        return weight.float()
    if block_size is None:
        return weight.float() * scale.float().reshape(-1)[0]
    return dequantize_block(weight, scale, block_size)


def _gated(h: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    raise NotImplementedError(f"sgl_kernel CPU stand-in: MoE activation {activation!r} is not implemented")


def fused_experts_cpu(
    hidden_states,
    w1,
    w2,
    topk_weights,
    topk_ids,
    inplace,
    quant_method,
    w1_scale,
    w2_scale,
    w1_zp,
    w2_zp,
    block_size,
    w1_bias,
    w2_bias,
    alpha,
    limit,
    is_vnni,
    activation,
):
    """Each token through its top-k experts (gate/up fused in ``w1``, then ``w2``), weighted and summed."""
    if quant_method not in (FP8_W8A16, UNQUANT) or w1_zp is not None or alpha is not None or limit is not None:
        raise NotImplementedError(
            f"sgl_kernel CPU stand-in: fused_experts_cpu supports FP8 and unquantized experts without zero points, "
            f"alpha or limit (asked: quant_method={quant_method})"
        )
    quantized = quant_method == FP8_W8A16
    x = hidden_states.float()
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slot = (topk_ids == expert).nonzero(as_tuple=True)
        scale1 = None if w1_scale is None else w1_scale[expert]
        scale2 = None if w2_scale is None else w2_scale[expert]
        up = _expert_weight(w1[expert], scale1, block_size, quantized, is_vnni)
        down = _expert_weight(w2[expert], scale2, block_size, quantized, is_vnni)
        h = F.linear(x[tokens], up, None if w1_bias is None else w1_bias[expert].float())
        y = F.linear(_gated(h, activation), down, None if w2_bias is None else w2_bias[expert].float())
        out.index_add_(0, tokens, y * topk_weights[tokens, slot].float().unsqueeze(-1))
    result = out.to(hidden_states.dtype)
    if inplace:
        hidden_states.copy_(result)
        return hidden_states
    return result


def shared_expert_cpu(
    hidden_states,
    w1,
    w2,
    fused_experts_out,
    routed_scaling_factor,
    inplace,
    use_int8_w8a8,
    use_fp8_w8a16,
    w1_scale,
    w2_scale,
    block_size,
    is_vnni,
):
    """DeepSeek's shared expert on ``hidden_states`` plus the routed experts' output times the scaling factor."""
    if use_int8_w8a8:
        raise NotImplementedError("sgl_kernel CPU stand-in: shared_expert_cpu with INT8 W8A8 is not implemented")
    up = _expert_weight(w1, w1_scale, block_size, use_fp8_w8a16, is_vnni)
    down = _expert_weight(w2, w2_scale, block_size, use_fp8_w8a16, is_vnni)
    shared = F.linear(_gated(F.linear(hidden_states.float(), up), "silu"), down)
    result = (shared + fused_experts_out.float() * routed_scaling_factor).to(hidden_states.dtype)
    if inplace:
        hidden_states.copy_(result)
        return hidden_states
    return result


def convert_weight_packed(weight):
    return pack_vnni(weight)


# Ops SGLang's CPU branches look up when their module is imported (models/qwen3_5.py, which Qwen-VL's multimodal
# processor imports, models/grok.py, ...), which no CPU without a real sgl-kernel build has: without them the import
# fails, SGLang skips the module, and a Qwen-VL server cannot start at all. Each is a placeholder that raises, naming
# itself, if a forward ever calls it (none of them computes anything here). Found by importing every
# ``sglang.srt.models`` module on this environment (tests/test_cpu_kernels.py keeps the list complete).
IMPORT_TIME_OPS = (
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
    "fused_moe_router_cpu",
    "rmsnorm_cpu",
    "fused_dual_residual_rmsnorm_cpu",
)


def register_placeholders() -> list[str]:
    """Put under each name of IMPORT_TIME_OPS that torch's ``sgl_kernel`` namespace lacks the CPU stand-in's own
    function of that name, which raises, naming itself (a real kernel of that name is left alone); returns the names
    placed. Only on the stand-in (plugin.py)."""
    import sgl_kernel

    namespace = torch.ops.sgl_kernel
    placed = []
    for name in IMPORT_TIME_OPS:
        if not hasattr(namespace, name):
            setattr(namespace, name, getattr(sgl_kernel, name))
            placed.append(name)
    return placed


def register() -> list[str]:
    """Define every op above in torch's ``sgl_kernel`` namespace (once per process); returns the names defined.
    An op that already exists (a real CPU build of sgl-kernel) is left as it is."""
    global _library
    if _library is not None:
        return []
    existing = {name for name in SCHEMAS if hasattr(torch.ops.sgl_kernel, name)}
    _library = torch.library.Library("sgl_kernel", "FRAGMENT")
    defined = []
    for name, schema in SCHEMAS.items():
        if name in existing:
            continue
        _library.define(name + schema)
        _library.impl(name, globals()[name], "CPU")
        defined.append(name)
    return defined
