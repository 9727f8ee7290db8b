"""Stand-in for the CUDA-only ``sgl_kernel`` package, for running SGLang on a CPU without AMX.

Placed first on PYTHONPATH by ``python -m sglang_ckpt_plugin.cpu_env``. SGLang imports these names at start-up but
its CPU path calls only one of them on such machines: ``copy_all_layer_kv_cache_cpu`` (the KV pool's slot move,
warmed up whenever a draft model shares the pool), implemented below in plain torch, byte for byte. Every other
attribute is a function that raises NotImplementedError naming itself, so nothing runs silently on a fake kernel.
"""

import ctypes

import torch

__version__ = "0.0.0+sglang-ckpt-plugin-cpu-stub"
IS_CPU_STUB = True


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every KV buffer i (its address ``data_ptrs[i]``, rows of ``strides[i]`` bytes): row ``tgt_loc[j]`` takes
    the bytes of row ``src_loc[j]``. Every source row is read before any is written (a move, as SGLang's tiled
    kernel does for the disjoint slots it is given)."""
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.to(torch.int64), src_loc.to(torch.int64)
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        table = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        table[tgt] = table[src]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is the CPU stand-in from sglang-ckpt-plugin "
            "(the real sgl_kernel needs a GPU, or a CPU build of sgl-kernel with AMX)"
        )

    _missing.__name__ = name
    return _missing
