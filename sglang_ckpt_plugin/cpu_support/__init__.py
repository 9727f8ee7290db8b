"""CPU support for SGLang 0.5.23 on machines without a GPU (see ``python -m sglang_ckpt_plugin.cpu_env``).

``stub/sgl_kernel`` stands in for the CUDA-only ``sgl_kernel`` package: SGLang's CPU path imports a few
``*_cpu`` kernels from it at import time but, on a CPU without AMX, never calls them. ``plugin.py`` (entry point
``ckpt_cpu``) registers the ops of SGLang's CPU FP8 path, in plain torch (``kernels.py``), and turns that path on.
"""

from pathlib import Path

STUB_PATH = Path(__file__).parent / "stub"
