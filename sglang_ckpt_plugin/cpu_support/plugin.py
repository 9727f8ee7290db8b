"""Entry point ``ckpt_cpu`` in the ``sglang.srt.plugins`` group: the CPU environment's half of the plugin.

It changes nothing unless this process runs on the CPU stand-in of ``sgl_kernel`` (``cpu_env``): there it registers
the plain-torch kernels of SGLang's CPU FP8 path (kernels.py) and lets SGLang take that path on a CPU without AMX, and
places raising placeholders for the ops SGLang's modules look up at import (so Qwen-VL's processor imports).
It carries none of the weight-update hooks (those are ``ckpt_plugin``), so a server started with
``SGLANG_PLUGINS`` naming ``ckpt_cpu`` alone is SGLang itself on the same CPU environment: the reference a quantized
push is compared with.
"""

from __future__ import annotations

NAME = "ckpt_cpu"  # the entry point's name, for SGLANG_PLUGINS


def on_cpu_stand_in() -> bool:
    try:
        import sgl_kernel
    except Exception:  # the real package fails to import without CUDA: not our environment
        return False
    return bool(getattr(sgl_kernel, "IS_CPU_STUB", False))


def register() -> None:
    if not on_cpu_stand_in():
        return
    from ..server import sglang_compat as sg
    from . import kernels

    kernels.register_placeholders()  # before SGLang imports its model modules
    sg.enable_fp8_on_cpu_without_amx(kernels.register)
