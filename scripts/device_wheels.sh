#!/usr/bin/env bash
# Wheels the --no-sglang device check needs on a GPU machine that has torch, safetensors, xxhash, httpx and tqdm
# but no registry (Python 3.12, x86-64): pyzmq and msgspec, into .whl/ (ignored by git, ~2 MB).
#   scripts/device_wheels.sh
# There, first: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#               export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in pyzmq==27.3.0 msgspec==0.23.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl
