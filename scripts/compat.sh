#!/usr/bin/env bash
# The end-to-end smoke against another SGLang release, in its own environment (.venv-sglang-<X>):
#   make compat SGLANG=0.5.22
# 1. a venv with exactly that SGLang (with its own torch pin), 2. the plugin and its own dependencies installed
# on top, which must leave that SGLang and its torch untouched, 3. patches/sglang-<X>-*.patch applied, 4. the
# tests marked `compat`: the gate (503 to health and generation until weights arrive), a push, the pushed
# weights bit-identical to SGLang's own disk reload of the same files, and the release check.
set -euo pipefail
cd "$(dirname "$0")/.."
X=${1:?usage: scripts/compat.sh <sglang version>, e.g. 0.5.22}
PY=${PYTHON:-python3}
VENV=.venv-sglang-$X
if [ ! -f "$VENV/.sglang-only" ]; then  # made once; the plugin is (re)installed on top every run
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # SGLang's own pins, except CUDA-only kernel packages that cannot install without a GPU driver or NVIDIA's
  # index (cuda-tile's wheel is a stub that downloads at install time); docs/reference.md#sglang-releases
  "$VENV/bin/python" -m pip install -q --no-deps "sglang==$X"
  "$VENV/bin/python" - <<'PYEOF' > "$VENV/sglang-requirements.txt"
import re
from importlib.metadata import requires
SKIP = {"cuda-tile"}
for req in requires("sglang") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0].lower()
    if name not in SKIP:
        print(req)
PYEOF
  torch_pin=$(grep -iE '^torch[ =<>]' "$VENV/sglang-requirements.txt" | head -1 | tr -d ' ')
  if [ "$torch_pin" = "torch==2.14.1" ]; then  # with its torchvision first, both from this machine's disk
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  elif [ -n "$torch_pin" ]; then
    # Another torch: PyPI's own build with its matching torchvision (--isolated: this machine's pip settings
    # prefer a CPU-only torch file from local disk, beside which PyPI's torchvision cannot load)
    "$VENV/bin/python" -m pip install -q --isolated "$torch_pin" torchvision
  fi
  "$VENV/bin/python" -m pip install -q -r "$VENV/sglang-requirements.txt"
  touch "$VENV/.sglang-only"
fi
# Source patches for this release (patches/README.md), each applied once
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for p in patches/sglang-"$X"-*.patch; do
  [ -e "$p" ] || continue
  if patch -p1 -R --dry-run -s -f -d "$site" < "$p" > /dev/null 2>&1; then continue; fi
  patch -p1 -s -f -d "$site" < "$p"
  echo "[compat] applied $p"
done
before=$("$VENV/bin/python" -m pip freeze | grep -iE '^(sglang|torch)==' | sort)
# The plugin and its own dependencies (not SGLang's again: SGLang's pins include CUDA-only packages that this
# machine cannot install or even resolve: cuda-tile builds its metadata with nvidia-smi), then the promise.
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PYEOF' > "$VENV/plugin-requirements.txt"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if not req.startswith("sglang"):
        print(req)
PYEOF
"$VENV/bin/python" -m pip install -q -r "$VENV/plugin-requirements.txt"
# pip's own judgement of the plugin's requirements against what is installed (pip check; its lines about SGLang's
# CUDA-only pins are SGLang's, not ours): a requirement this SGLang or torch does not satisfy is one that
# `pip install sglang-ckpt-plugin` would satisfy by changing them.
unmet=$("$VENV/bin/python" -m pip check 2>&1 | grep -i '^sglang-ckpt-plugin ' || true)
if [ -n "$unmet" ]; then
  echo "FAIL: pip would change what is installed to satisfy the plugin:"; echo "$unmet"
  exit 1
fi
after=$("$VENV/bin/python" -m pip freeze | grep -iE '^(sglang|torch)==' | sort)
if [ "$before" != "$after" ]; then
  echo "FAIL: installing the plugin changed SGLang or torch:"; diff <(echo "$before") <(echo "$after") || true
  exit 1
fi
echo "[compat] $(echo $after | tr '\n' ' ') — unchanged by installing the plugin, and pip check finds every requirement of the plugin met"
exec "$VENV/bin/python" -m pytest tests -m compat -v -p no:cacheprovider "${@:2}"
