"""The kills-at-any-moment script (scripts/kill_anywhere.py, issue 28) as a 3-trial sample: its 100-trial run is in
docs/failure-modes.md. Seed 31 draws a loader rank killed while staging, a server's scheduler killed while staging
(restarted on dummy weights, refilled by the resident loader) and a loader rank killed after a random delay."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_three_kills_leave_every_instance_on_one_whole_checkpoint_and_nothing_behind(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/kill_anywhere.py"), "--trials", "3", "--seed", "31"]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["failures"] == 0, summary
    victims = [line.split("killed ")[1].split(" rank")[0] for line in summary["lines"]]
    assert victims == ["loader", "server", "loader"], summary["lines"]  # the seed's draws: both kinds were killed
    assert "3 of 3 trials" in proc.stdout
