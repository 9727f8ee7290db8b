"""Kills at any moment (issue 28): a fleet of two SGLang servers on CPU (tiny Llama, ``--wait-for-initial-weights``)
kept by one resident loader group (``--watch``: one torchrun rank per "node"). Each trial writes the next checkpoint
(A and B in turn) into the watched directory and SIGKILLs, at a random moment of that update, a random loader rank
or a random server rank (a scheduler). Moments: while the update stages, once it is staged (the fleet waits for
every instance), during or after the commit (as the victim's server reports it), or after a random delay.

Then, for every trial:
- every live instance serves exactly one complete checkpoint: SGLang's ``/weights_checker`` checksum equals the
  one after SGLang's own load of A or of B, never a mix; or its gate is shut (503) and nothing is served;
- a killed loader group exits (it is restarted, as torchrun's ``--max-restarts`` would); a killed server is
  restarted on dummy weights and refilled by the resident loader;
- the fleet ends on the newest checkpoint (its checksum, its version), and no shared-memory segment or socket file
  of ours is left; at the end no process of ours is.

    .venv/bin/python scripts/kill_anywhere.py [--trials 100] [--seed 0] [--workdir DIR]

Prints one line per trial and a count; exits 1 if any trial found something.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from watch_bench import link_checkpoint  # noqa: E402

from sglang_ckpt_plugin.demo import evidence  # noqa: E402
from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port  # noqa: E402
from sglang_ckpt_plugin.demo.processes import (  # noqa: E402
    alive,
    children_of,
    our_leftovers,
    scheduler_pids,
    stop_torchrun_group,
)
from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model  # noqa: E402
from sglang_ckpt_plugin.loader.cli import torchrun_command  # noqa: E402
from sglang_ckpt_plugin.loader.watchdog import GRACE_S  # noqa: E402

MOMENTS = ("staging", "staged", "committing", "committed", "delay")
PROGRESS = {"staging": 0, "staged": 1, "committing": 2, "committed": 3}  # an update's states on the server, in order
LOADER_TIMEOUT_S = 120  # the loaders' --timeout; a rank that lost its peer exits within it plus the watchdog's grace
READ_RATE = "2M"  # bytes/s per loader rank: staging takes about a second, so kills land inside it


def info(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/model_info", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def staging_of(url: str) -> tuple[str | None, str | None]:
    doc = info(url)
    staging = (doc or {}).get("ckpt_plugin", {}).get("staging") or {}
    return staging.get("state"), staging.get("update_id")


class Fleet:
    def __init__(self, work: Path, model: Path):
        self.work, self.watched = work, work / "watched"
        self.watched.mkdir()
        self.servers = [SGLangServer(model, work / f"server{i}.log", extra_args=["--sleep-on-idle"]) for i in range(2)]
        self.group: list[subprocess.Popen] = []
        self.logs: list = []  # the group's log files, closed when the next group starts and at the end
        self.starts = 0
        self.seen_loader_pids: set[int] = set()

    def start_servers(self) -> None:
        for srv in self.servers:
            srv.start()
        for srv in self.servers:
            srv.wait_listening()

    def start_group(self) -> None:
        """One resident loader per node, as on two machines (torchrun --nnodes 2)."""
        self.starts += 1
        port, env = free_port(), {**os.environ, "SGLANG_CKPT_READ_RATE": READ_RATE}
        self.close_logs()
        self.group = []
        for node, srv in enumerate(self.servers):
            loader = [
                "--watch",
                str(self.watched),
                "--endpoint",
                srv.url,
                "--quiet",
                "--timeout",
                str(LOADER_TIMEOUT_S),
            ]
            loader += ["--poll-s", "0.2", "--bucket-size", "256K"]
            cmd = torchrun_command(loader, port=port, nnodes=2, node_rank=node)
            log = open(self.work / f"loader{node}-{self.starts}.log", "w")
            self.logs.append(log)
            self.group.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            )

    def loader_ranks(self) -> list[int]:
        """The loader ranks (torchrun's workers), node 0's first."""
        ranks = [pid for agent in self.group for pid in children_of(agent.pid)]
        self.seen_loader_pids.update(ranks)
        return ranks

    def group_exited(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.group) and not self.live_loader_pids():
                return True
            time.sleep(0.2)
        return False

    def stop_group(self) -> None:
        stop_torchrun_group(self.group)
        self.close_logs()

    def close_logs(self) -> None:
        for log in self.logs:
            log.close()
        self.logs = []

    def stacks_of_live_ranks(self) -> str:
        """The Python stacks of the loader ranks still running (the loader dumps them on SIGUSR1 into its log)."""
        live = self.live_loader_pids()
        for pid in live:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(2)
        return f"ranks still running: {live}\n" + self.logs_tail(lines=80)

    def live_loader_pids(self) -> list[int]:
        return [pid for pid in self.seen_loader_pids if alive(pid)]

    def logs_tail(self, lines: int = 15) -> str:
        tails = []
        for node in range(2):
            path = self.work / f"loader{node}-{self.starts}.log"
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serving_state(url: str, references: dict[str, str]) -> tuple[str, str | None]:
    """("A"/"B"/"closed"/"down", weight_version); raises AssertionError for a complete server serving a mix."""
    doc = info(url)
    if doc is None:
        return "down", None
    try:
        if not doc.get("weights_loaded"):
            body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
            code = httpx.post(f"{url}/generate", json=body, timeout=60).status_code
            if code != 503 and (info(url) or {}).get("weights_loaded"):
                return serving_state(url, references)  # a refill completed between the two questions
            assert code == 503, f"{url}: gate shut but generation answered {code}"
            return "closed", doc.get("weight_version")
        served = evidence.checksum(url)
    except httpx.HTTPError:  # it went down between the two questions
        return "down", None
    for name, checksum in references.items():
        if served == checksum:
            return name, doc.get("weight_version")
    raise AssertionError(f"{url} says its weights are complete but serves neither A nor B (checksum {served[:16]})")


def wait_for_moment(url: str, moment: str, previous_id: str | None, rng: random.Random, timeout_s: float) -> str:
    """Returns once the victim's server reports ``moment`` for this update (or the random delay passed); what was
    seen, for the trial's line."""
    if moment == "delay":
        delay = rng.uniform(0.0, 3.0)
        time.sleep(delay)
        return f"after {delay:.2f} s"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, update_id = staging_of(url)
        if update_id and update_id != previous_id and state == moment:
            return f"at {moment}"
        if update_id and update_id != previous_id and PROGRESS.get(state, 9) > PROGRESS[moment]:
            return f"at {state} (passed {moment} between polls)"
        time.sleep(0.005)
    return f"{moment} not seen within {timeout_s:g} s"


def converge(fleet: Fleet, version: str, want: str, references: dict[str, str], timeout_s: float) -> None:
    """Both instances serve ``version`` = checkpoint ``want``; the loader group is restarted if it stopped."""
    deadline, states = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in fleet.group):
            assert fleet.group_exited(60), "one node's loader exited and the other did not:\n" + fleet.logs_tail()
            fleet.start_group()
        states = [serving_state(srv.url, references) for srv in fleet.servers]
        if all(state == (want, version) for state in states):
            return
        time.sleep(0.3)
    raise AssertionError(
        f"the fleet did not reach {version} ({want}) within {timeout_s:g} s: {states}\n" + fleet.logs_tail()
    )


def trial(
    fleet: Fleet,
    number: int,
    rng: random.Random,
    ckpts: dict[str, Path],
    references: dict[str, str],
    victims: tuple[str, ...] = ("loader", "server"),
) -> str:
    want, version = "AB"[number % 2], f"step-{number}"
    victim, node, moment = rng.choice(victims), rng.randrange(2), rng.choice(MOMENTS)
    srv = fleet.servers[node]
    previous = staging_of(srv.url)[1]
    link_checkpoint(ckpts[want], fleet.watched / version)
    seen = wait_for_moment(srv.url, moment, previous, rng, timeout_s=30)
    if victim == "loader":
        deadline = time.monotonic() + 60  # a group restarted by the last trial may still be starting its ranks
        while len(ranks := fleet.loader_ranks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2, f"the loader group runs {len(ranks)} ranks:\n" + fleet.logs_tail()
        _kill(ranks[node])
    else:
        for pid in scheduler_pids(srv.proc.pid):
            _kill(pid)
    # right after the kill: whatever each live instance serves is one whole checkpoint, or nothing
    now = [serving_state(s.url, references)[0] for s in fleet.servers]
    if victim == "loader":
        # a rank still joining the group when its peer (the store's host) died waits out the store's --timeout
        assert fleet.group_exited(LOADER_TIMEOUT_S + GRACE_S), (
            "the group did not stop after losing a rank:\n" + fleet.stacks_of_live_ranks()
        )
        fleet.start_group()
    else:
        deadline = time.monotonic() + 60
        while srv.group_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not srv.group_pids(), f"server {node} lives on without its scheduler: {srv.log_tail(20)}"
        srv.stop()
        srv.start()
        srv.wait_listening()
    converge(fleet, version, want, references, timeout_s=240)
    return f"killed {victim} rank {node} {seen}; right after: {now}; then both on {version} ({want})"


def no_leftovers(baseline: set[str], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := set(our_leftovers()) - baseline) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {sorted(left)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--victims", default="loader,server", help="what may be killed: loader, server or both")
    a = p.parse_args()
    victims = tuple(a.victims.split(","))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sglang-ckpt-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpts = {
        "A": make_tiny_model(work / "A", "llama", seed=0, dtype=torch.float32, max_shard_size="150KB"),
        "B": make_tiny_model(work / "B", "llama", seed=1, dtype=torch.float32, max_shard_size="150KB"),
    }
    rng = random.Random(a.seed)
    fleet = Fleet(work, ckpts["A"])
    failures, lines = 0, []
    try:
        fleet.start_servers()
        references = {}
        for name in ("A", "B"):  # SGLang's own load of each, before any loader runs
            evidence.reload_from_disk(fleet.servers[0].url, ckpts[name])
            references[name] = evidence.checksum(fleet.servers[0].url)
        assert references["A"] != references["B"]
        baseline = set(our_leftovers())
        link_checkpoint(ckpts["A"], fleet.watched / "step-0")
        fleet.start_group()
        converge(fleet, "step-0", "A", references, timeout_s=300)
        for number in range(1, a.trials + 1):
            t0 = time.monotonic()
            try:
                said = trial(fleet, number, rng, ckpts, references, victims)
                no_leftovers(baseline)
                line = f"trial {number}: ok in {time.monotonic() - t0:.0f} s: {said}"
            except AssertionError as exc:
                failures += 1
                line = f"trial {number}: FAILED: {exc}"
                fleet.stop_group()  # start the next trial from a known state
                for srv in fleet.servers:
                    if not srv.group_pids():
                        srv.stop()
                        srv.start()
                        srv.wait_listening()
                fleet.start_group()
                try:
                    converge(fleet, f"step-{number}", "AB"[number % 2], references, timeout_s=300)
                except AssertionError as again:
                    lines.append(line)
                    print(line, flush=True)
                    print(f"the fleet did not recover, stopping: {again}", flush=True)
                    break
            lines.append(line)
            print(line, flush=True)
    finally:
        fleet.stop_group()
        for srv in fleet.servers:
            srv.stop()
    left = fleet.live_loader_pids() + [pid for srv in fleet.servers for pid in srv.group_pids()]
    if left:
        failures += 1
        print(f"processes left at the end: {left}")
    done = len(lines)
    print(
        f"\n{done - failures} of {done} trials: every instance served one whole checkpoint, the fleet ended on "
        f"the newest, nothing left behind (seed {a.seed}; work {work})"
    )
    (work / "summary.json").write_text(json.dumps({"trials": done, "failures": failures, "lines": lines}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
