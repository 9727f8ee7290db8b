"""Stand-in for the CUDA-only ``sgl_kernel`` package, for running SGLang on a CPU without AMX.

Placed first on PYTHONPATH by ``python -m sglang_ckpt_plugin.cpu_env``. Every attribute is a function that
raises NotImplementedError: SGLang imports these names at start-up but its CPU path does not call them on
such machines. If one is ever called, the error names it, so nothing runs silently on a fake kernel.
"""

__version__ = "0.0.0+sglang-ckpt-plugin-cpu-stub"
IS_CPU_STUB = True


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
