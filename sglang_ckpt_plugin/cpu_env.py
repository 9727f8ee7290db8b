"""Print the shell ``export`` lines that make SGLang 0.5.23 run on this CPU.

    eval "$(python -m sglang_ckpt_plugin.cpu_env)"
    python -m sglang.launch_server --device cpu --max-total-tokens 4096 ...

- SGLANG_USE_CPU_ENGINE=1: SGLang's CPU code paths (otherwise a vllm import fails).
- PYTHONPATH starts with our ``sgl_kernel`` stand-in (the real one is CUDA-only). It must be in the
  environment: SGLang's scheduler and detokenizer are spawned processes that import it before plugins load.
- SGLANG_CPU_OMP_THREADS_BIND: one core range per TP rank, needed for --tp > 1 on CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex

from .cpu_support import STUB_PATH


def cpu_environment(tp_size: int = 1, cores: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The variables to set (values complete, PYTHONPATH included) for SGLang on CPU."""
    base = os.environ if base is None else base
    cores = cores or len(os.sched_getaffinity(0))
    per_rank = max(cores // tp_size, 1)
    binds = [f"{r * per_rank}-{r * per_rank + per_rank - 1}" if per_rank > 1 else str(r * per_rank % cores)
             for r in range(tp_size)]  # fmt: skip
    old_path = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(STUB_PATH)]
    return {
        "SGLANG_USE_CPU_ENGINE": "1",
        "PYTHONPATH": os.pathsep.join([str(STUB_PATH), *old_path]),
        "SGLANG_CPU_OMP_THREADS_BIND": "|".join(binds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the server will use")
    args = parser.parse_args()
    for key, value in cpu_environment(args.tp).items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
