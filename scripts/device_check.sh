#!/usr/bin/env bash
# The CUDA-path check as one command:
#   scripts/device_check.sh                          # GPU + SGLang: random bf16 model, CUDA IPC push, figures
#   scripts/device_check.sh --device cpu             # the same steps on the CPU path (run by the test suite)
#   scripts/device_check.sh --fp8 [--device cpu]     # block FP8: pushes and SGLang's reload against fresh servers
#   scripts/device_check.sh --no-sglang [--device cpu]
#       no SGLang needed (torch, safetensors, xxhash, httpx, tqdm + pyzmq, msgspec): the real loader into a
#       stand-in server running the real receiver on the GPU; byte identity, memory, copy-rate ratios.
#       Runs with the python on PATH (PYTHON=...), the repository on PYTHONPATH: for a GPU machine without a
#       registry, carry wheels (scripts/device_wheels.sh) and install them first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--no-sglang" ]; then
  shift
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" bench/standalone_check.py "$@"
  # the read stage alone: threads x staging memory (pinned, registered) against pinned H2D (bench/read_bench.py)
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" bench/read_bench.py --device cuda --gb "${READ_GB:-4}" --threads 1,4,8,16,32
  fi
  exit 0
fi
# on a GPU machine the venv sees the system's CUDA torch (--system-site-packages)
if [ ! -f .venv/.installed ]; then make venv VENV_FLAGS=--system-site-packages; fi
exec .venv/bin/python bench/device_check.py "$@"
