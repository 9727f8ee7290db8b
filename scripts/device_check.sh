#!/usr/bin/env bash
# The CUDA-path check as one command (under 8 minutes on a GPU machine):
#   scripts/device_check.sh                 # GPU: ~4 GB random bf16 model, CUDA IPC push, figures
#   scripts/device_check.sh --device cpu    # the same steps on the CPU path (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/.installed ]; then make venv; fi
exec .venv/bin/python bench/device_check.py "$@"
