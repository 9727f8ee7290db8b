#!/usr/bin/env bash
# Kill trials for two-phase fleet updates: N times (default 20), one loader rank of a 2-instance fleet is SIGKILLed
# at a random point of staging (seeded: while reading bucket k ahead, or right after handing bucket k over) while
# clients generate on both instances; every trial checks that both kept serving their old version (no 503, no
# error, same greedy output), left nothing behind, and that a fresh fleet update then succeeds.
#   scripts/kill_trials.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
seeds=$(seq -s, 100 $((99 + n)))
CKPT_TEST_KILL_SEEDS="$seeds" .venv/bin/python -m pytest tests/test_e2e_multinode.py -q \
    -k "killed_while_a_fleet_stages" -p no:cacheprovider
