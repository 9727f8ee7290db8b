"""Print the shell ``export`` lines that make SGLang run on this CPU (any --tp / --dp / --pp).

    eval "$(python -m sglang_ckpt_plugin.cpu_env)"
    python -m sglang.launch_server --device cpu --max-total-tokens 4096 ...

- SGLANG_USE_CPU_ENGINE=1: SGLang's CPU code paths (otherwise a vllm import fails).
- PYTHONPATH starts with our ``sgl_kernel`` stand-in (the real one is CUDA-only). It must be in the
  environment: SGLang's scheduler and detokenizer are spawned processes that import it before plugins load.
- SGLANG_CPU_OMP_THREADS_BIND (one core range per rank; SGLang asserts without it when a CPU server has more
  ranks than NUMA nodes) is set by the plugin itself when unset, from the server's own --tp/--dp/--pp, before
  SGLang starts its schedulers (``core_binds``). ``--tp N`` here exports it explicitly instead.
"""

from __future__ import annotations

import argparse
import os
import shlex

from .cpu_support import STUB_PATH


def core_binds(ranks: int, cores: list[int] | None = None) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for ``ranks`` ranks: this process's cores split into equal ranges, one per rank
    (a rank per core, round robin, when there are fewer cores than ranks)."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    per_rank = len(cores) // ranks
    if per_rank <= 1:
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    groups = [cores[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    return "|".join(",".join(_ranges(g)) for g in groups)


def _ranges(cores: list[int]) -> list[str]:
    """[0,1,2,5] -> ["0-2", "5"] (SGLang parses each group as comma-separated ranges)."""
    out, start = [], cores[0]
    for prev, cur in zip(cores, cores[1:] + [None]):
        if cur is None or cur != prev + 1:  # a run ends at prev
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return out


def cpu_environment(tp_size: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The variables to set (values complete, PYTHONPATH included) for SGLang on CPU. ``tp_size``: also bind
    cores explicitly for that many ranks (otherwise the plugin binds them from the server's own sizes)."""
    base = os.environ if base is None else base
    old_path = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(STUB_PATH)]
    env = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": os.pathsep.join([str(STUB_PATH), *old_path])}
    if tp_size is not None:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = core_binds(tp_size)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="also export SGLANG_CPU_OMP_THREADS_BIND for this many ranks (by default the plugin "
        "binds cores from the server's own --tp/--dp/--pp)",
    )
    args = parser.parse_args()
    for key, value in cpu_environment(args.tp).items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
