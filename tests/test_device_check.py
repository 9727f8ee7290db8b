"""scripts/device_check.sh on the CPU path (the same script a GPU machine runs with --device cuda), with SGLang
and without it (``--no-sglang``: the real loader into a stand-in server running the real receiver)."""

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_runs_on_the_cpu_path(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "scripts/device_check.sh"), "--device", "cpu", "--gb", "0.4", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| greedy output: push == disk reload | True |" in proc.stdout
    assert "| /weights_checker checksum: push == disk reload | True |" in proc.stdout
    assert "| SGLang /update_weights_from_disk |" in proc.stdout
    assert "| the second push changed what is served (checksum of A != of B) | True |" in proc.stdout


def test_device_check_without_sglang_runs_on_the_cpu_path(tmp_path):
    proc = subprocess.run(
        [
            str(ROOT / "scripts/device_check.sh"),
            "--no-sglang",
            "--device",
            "cpu",
            "--gb",
            "0.1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith(("| loader", "| LocalPush ")) and "| yes" in line or "| NO |" in line
    ]
    assert len(rows) == 7 and all("| yes |" in row for row in rows), rows  # 4 loader variants, 3 LocalPush pushes
    # what failures leave behind (bench/leak_check.py): nothing parked, each failure said why, the refusal in words
    failed = [line for line in proc.stdout.splitlines() if line.startswith("| 3 failed updates (")]
    assert len(failed) == 1 and "| each failed, with its reason | n/a (cpu), 0 loader mappings parked |" in failed[0]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("| LocalPush refused, then closed")]
    assert len(refused) == 1 and "| refused with its reason |" in refused[0], refused
    sums = [line for line in proc.stdout.splitlines() if line.startswith("| word sums on cpu == on the host")]
    assert len(sums) == 1 and "| True |" in sums[0], sums
    assert "VERDICT PASS" in proc.stdout
