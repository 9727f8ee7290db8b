#!/usr/bin/env bash
# Run fault tests again and again with both cores kept busy, until one fails or N runs in a row pass.
#   scripts/soak_faults.sh [N] [pytest -k expression]
# A hang shows up as the loader's stack dump (tests/conftest.py run_with_stacks) in the failing run's output.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
K=${2:-}
burners=()
for _ in $(nproc); do :; done
for i in $(seq "$(nproc)"); do .venv/bin/python -c 'while True: pass' & burners+=($!); done
trap 'kill "${burners[@]}" 2>/dev/null' EXIT
for i in $(seq "$N"); do
  start=$(date +%s)
  if ! .venv/bin/python -m pytest tests/test_e2e_faults.py -x -q -p no:cacheprovider ${K:+-k "$K"} > ".soak-run-$i.log" 2>&1; then
    echo "run $i FAILED after $(( $(date +%s) - start )) s; see .soak-run-$i.log"; tail -5 ".soak-run-$i.log"; exit 1
  fi
  echo "run $i passed in $(( $(date +%s) - start )) s: $(tail -1 ".soak-run-$i.log")"
  rm -f ".soak-run-$i.log"
done
echo "$N runs in a row passed under load"
