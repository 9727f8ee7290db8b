"""The plain-torch ``sgl_kernel`` CPU ops of SGLang's FP8 path (sglang_ckpt_plugin/cpu_support/kernels.py): the
packing is the VNNI permutation itself (so a weight left row-major in packed storage computes wrong), and each op
equals its definition on dequantized weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sglang_ckpt_plugin.cpu_support import kernels
from sglang_ckpt_plugin.demo.tiny_quantized import quantize_block_fp8


def packed_by_definition(weight: torch.Tensor) -> torch.Tensor:
    """sgl-kernel's layout spelled out element by element: rows in blocks of 32, each block [n, K] -> [K/2, n, 2]."""
    n_rows, k = weight.shape
    flat = torch.empty(n_rows * k, dtype=weight.dtype)
    for start in range(0, n_rows, 32):
        n = min(32, n_rows - start)
        for row in range(n):
            for col in range(k):
                flat[start * k + (col // 2) * n * 2 + row * 2 + col % 2] = weight[start + row, col]
    return flat.view(n_rows, k)


@pytest.mark.parametrize("rows", [32, 40, 64])
def test_packing_is_the_vnni_permutation_and_unpacking_inverts_it(rows):
    weight = torch.randn(rows, 8)
    packed = kernels.pack_vnni(weight)
    assert packed.shape == weight.shape
    assert torch.equal(packed, packed_by_definition(weight))
    assert not torch.equal(packed, weight)  # never an identity: a stale row-major layout shows
    assert torch.equal(kernels.unpack_vnni(packed), weight)


def test_fp8_and_3d_expert_weights_pack_byte_for_byte():
    experts = torch.randn(3, 48, 16).to(torch.float8_e4m3fn)
    packed = kernels.pack_vnni(experts)
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == experts.shape
    for e in range(3):
        assert torch.equal(packed[e].view(torch.uint8), packed_by_definition(experts[e].view(torch.uint8)))
    assert torch.equal(kernels.unpack_vnni(packed).view(torch.uint8), experts.view(torch.uint8))


def test_block_fp8_linear_dequantizes_each_block_and_a_stale_layout_computes_wrong():
    weight, scale = quantize_block_fp8(torch.randn(256, 384), [128, 128])
    x = torch.randn(5, 384).to(torch.bfloat16)
    expected = F.linear(x.float(), kernels.dequantize_block(weight, scale, [128, 128])).to(torch.bfloat16)
    out = kernels.fp8_scaled_mm_cpu(x, kernels.pack_vnni(weight), scale, [128, 128], None, torch.bfloat16, True)
    assert torch.equal(out, expected)
    stale = kernels.fp8_scaled_mm_cpu(x, weight, scale, [128, 128], None, torch.bfloat16, True)
    assert not torch.allclose(stale.float(), expected.float(), atol=1e-1)
    dequantized = kernels.dequantize_block(weight, scale, [128, 128])
    assert torch.equal(dequantized[:128, :128], weight[:128, :128].float() * scale[0, 0])


def test_per_tensor_fp8_linear():
    weight = torch.randn(64, 32).to(torch.float8_e4m3fn)
    x, scale = torch.randn(3, 32), torch.tensor([0.25])
    out = kernels.fp8_per_tensor_scaled_mm_cpu(x, kernels.pack_vnni(weight), scale, None, torch.float32, True)
    assert torch.equal(out, F.linear(x, weight.float() * 0.25))


def test_fused_experts_route_each_token_through_its_top_k_experts():
    torch.manual_seed(0)
    hidden, inter, experts = 128, 128, 3
    w13 = [quantize_block_fp8(torch.randn(2 * inter, hidden), [128, 128]) for _ in range(experts)]
    w2 = [quantize_block_fp8(torch.randn(hidden, inter), [128, 128]) for _ in range(experts)]
    x = torch.randn(4, hidden).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]])
    weights = torch.rand(4, 2)
    out = kernels.fused_experts_cpu(
        x,
        kernels.pack_vnni(torch.stack([w for w, _ in w13])),
        kernels.pack_vnni(torch.stack([w for w, _ in w2])),
        weights,
        ids,
        False,
        kernels.FP8_W8A16,
        torch.stack([s for _, s in w13]),
        torch.stack([s for _, s in w2]),
        None,
        None,
        [128, 128],
        None,
        None,
        None,
        None,
        True,
        "silu",
    )
    expected = torch.zeros(4, hidden)
    for t in range(4):
        for slot in range(2):
            e = int(ids[t, slot])
            h = F.linear(x[t].float(), kernels.dequantize_block(*w13[e], [128, 128]))
            y = F.linear(F.silu(h[:inter]) * h[inter:], kernels.dequantize_block(*w2[e], [128, 128]))
            expected[t] += weights[t, slot] * y
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_registered_ops_are_what_sglang_calls_and_leave_an_existing_kernel_alone():
    """In a process of its own: registering defines the ops in torch's sgl_kernel namespace once."""
    code = (
        "import torch\n"
        "from sglang_ckpt_plugin.cpu_support import kernels\n"
        "first = kernels.register(); again = kernels.register()\n"
        "assert first == list(kernels.SCHEMAS) and again == [], (first, again)\n"
        "w = torch.randn(64, 16)\n"
        "assert torch.equal(torch.ops.sgl_kernel.convert_weight_packed(w), kernels.pack_vnni(w))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_sglang_model_module_imports_on_this_cpu_and_a_placeholder_names_itself():
    """In the CPU environment, with the CPU half of the plugin loaded as SGLang loads it: no SGLang model module fails
    to import for want of an ``sgl_kernel`` op (SGLang would skip it: a Qwen-VL server could not start, its processor
    imports models/qwen3_5.py); a placeholder that a forward calls raises, naming itself."""
    from sglang_ckpt_plugin.cpu_env import cpu_environment

    code = (
        "import importlib, pkgutil, re, torch\n"
        "from sglang_ckpt_plugin.cpu_support import plugin\n"
        "plugin.register()\n"
        "import sglang.srt.models as models\n"
        "missing = set()\n"
        "for info in pkgutil.iter_modules(models.__path__):\n"
        "    try:\n"
        "        importlib.import_module('sglang.srt.models.' + info.name)\n"
        "    except Exception as exc:\n"
        "        found = re.search(r\"'sgl_kernel' object has no attribute '(\\w+)'\", str(exc))\n"
        "        if found: missing.add(found.group(1))\n"
        "assert not missing, f'add to kernels.IMPORT_TIME_OPS: {sorted(missing)}'\n"
        "import sglang.srt.models.qwen3_5, sglang.srt.models.grok\n"
        "try:\n"
        "    torch.ops.sgl_kernel.fused_sigmoid_mul_cpu(torch.ones(2), torch.ones(2))\n"
        "except NotImplementedError as exc:\n"
        "    assert 'sgl_kernel.fused_sigmoid_mul_cpu is not available' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a placeholder computed something')\n"
    )
    env = {**os.environ, **cpu_environment()}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
