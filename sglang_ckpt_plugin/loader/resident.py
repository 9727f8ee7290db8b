"""``--watch DIR``: a loader that stays. It keeps its process, imports, process group and server clients between
updates, pushes each new complete checkpoint under DIR to every instance that is up, and refills any instance
that comes back without complete weights (a restarted server, or one left incomplete by a failed update) with the
checkpoint the others serve, touching no other instance.

Every ``--poll-s`` all ranks meet once: each instance's leader says what its server reports (``/model_info``),
rank 0 scans DIR and decides one ``Action``, which every rank receives as JSON and runs as an ordinary update
(run.py ``Update``; the receivers are the feeders of the instances it names). A push that fails (the servers
refused the checkpoint, a rank failed) leaves every instance on what it served; its directory is skipped, with
the reason in the log and the status file, until its files change. SIGTERM / Ctrl-C: a lone loader process
unwinds the update in progress (its staged bytes are dropped on the server) and exits 0; ranks of a torchrun
group stop together at their next meeting, after the update in progress; a second signal stops at once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from . import watchdog
from .http import PLUGIN_MARKER
from .options import LoaderOptions
from .rank_setup import PeerFailed
from .route import Route
from .run import UPDATE_ERRORS, Update
from .watch_dir import Candidate, CheckpointWatch
from .world import Control, LoaderWorld


class Session(Protocol):
    """What a resident loader needs of the session that started it (loader/session.py, which imports this one)."""

    world: LoaderWorld
    control: Control
    route: Route
    asked: dict

    def update(self, args: LoaderOptions, receivers: list[int]) -> Update: ...


REFILL_RETRY_S = 5.0  # a refill or a push that failed is tried again after this long
PUSH_ATTEMPTS = 3  # a checkpoint whose push failed this often is skipped until its files change
POLL_TIMEOUT_S = 2.0  # a server that does not answer /model_info within this is counted as down
TAG = "[sglang-ckpt watch]"


class Stop(BaseException):
    """SIGTERM / SIGINT: unwinds an update in progress through its clean-up."""


@dataclass(frozen=True)
class InstanceState:
    endpoint: str
    up: bool = False
    weights_state: str = ""  # the plugin's view: waiting / complete / incomplete
    weight_version: str | None = None


@dataclass(frozen=True)
class Action:
    kind: str = "idle"  # push: a new checkpoint to every instance up; refill: the served one to those behind;
    path: str = ""  # adopt: every instance up already serves the newest checkpoint
    version: str = ""
    instances: tuple[int, ...] = ()


def choose_action(
    newest: Candidate | None, serving: Candidate | None, states: list[InstanceState], may_refill: list[bool]
) -> Action:
    """What to do now: a newer checkpoint wins; else refill the instances that are up without complete weights
    (restarted with --wait-for-initial-weights, or left incomplete by a failed update) with ``serving``. An
    instance whose complete weights carry another version (a disk reload, a trainer's push) is left alone."""
    up = tuple(i for i, s in enumerate(states) if s.up)
    if newest is not None and up:
        if all(states[i].weights_state == "complete" and states[i].weight_version == newest.version for i in up):
            return Action("adopt", newest.path, newest.version, up)
        return Action("push", newest.path, newest.version, up)
    if serving is not None:
        behind = tuple(i for i in up if may_refill[i] and states[i].weights_state != "complete")
        if behind:
            return Action("refill", serving.path, serving.version, behind)
    return Action()


class Resident:
    def __init__(self, args: LoaderOptions, session: Session):
        self.args, self.session = args, session
        self.world, self.control = session.world, session.control
        self.watch = CheckpointWatch(Path(args.watch), args.ready_marker)
        self.serving: Candidate | None = None
        self.skipped: dict[tuple, str] = {}  # (path, signature) -> why its push failed, PUSH_ATTEMPTS times
        self.failed_pushes: dict[tuple, int] = {}  # (path, signature) -> pushes of it that failed so far
        self.push_retry_at = 0.0  # a push that failed waits this long before the next (a server coming back)
        self.passed_over: set[str] = set()  # older checkpoints a newer one superseded before they were pushed
        self.up_since: dict[int, float] = {}  # instance -> the meeting that first saw its server answer
        self.retry_at: dict[int, float] = {}  # instance -> when a failed refill may be tried again
        self.last_refill_s: dict[int, float] = {}
        self.in_progress: Action | None = None
        self.states: list[InstanceState] = []  # as of the last meeting
        self.newest: Candidate | None = None  # rank 0: the checkpoint its last decision named
        self.stopping = 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        watchdog.disarm()  # --timeout bounds each update, not the loader's life
        if self.world.rank == 0:
            print(f"{TAG} watching {self.args.watch} for checkpoints (every {self.args.poll_s:g} s)", flush=True)
        try:
            while True:
                states, action = self.meet()
                if action.kind == "adopt":
                    self.serving = self.newest
                    self.say(f"every instance already serves {action.version}: watching for newer checkpoints")
                elif action.kind != "idle":
                    self.execute(action, states)
                self.write_status(states)
                time.sleep(self.args.poll_s)
        except Stop:
            self.in_progress = None
            self.say("stopped")
            self.write_status(self.states, stopped=True)
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.stopping += 1
        if not self.world.distributed or self.stopping > 1:
            raise Stop()

    def say(self, text: str) -> None:
        if self.world.rank == 0:
            print(f"{TAG} {text}", flush=True)

    # ------------------------------------------------------------------ one meeting
    def meet(self) -> tuple[list[InstanceState], Action]:
        """Collective: the servers' states, whether to stop (every rank at the same meeting), rank 0's decision."""
        try:
            states = self.poll()
            if self.control.any_failed(self.stopping > 0):
                raise Stop()
            return states, self.agree(self.decide(states) if self.world.rank == 0 else None)
        except RuntimeError as exc:  # a collective of the group failed: a peer rank is gone
            raise PeerFailed(
                f"a loader rank of this resident group is gone ({exc}); the group stops (torchrun's "
                "--max-restarts starts it again)"
            ) from exc

    def poll(self) -> list[InstanceState]:
        """Collective: what each instance's server reports, as its leader read it."""
        own = json.dumps(asdict(self.ask_own_server())) if self.world.is_leader else ""
        texts = self.control.all_gather_str(own)
        leaders = range(0, self.world.world_size, self.world.parallel_size)
        states = self.states = [InstanceState(**json.loads(texts[r])) for r in leaders]
        now = time.monotonic()
        for i, s in enumerate(states):
            if not s.up:
                self.up_since.pop(i, None)
            else:
                self.up_since.setdefault(i, now)
        return states

    def ask_own_server(self) -> InstanceState:
        client, endpoint = self.session.asked["client"], self.args.endpoint
        try:
            resp = client.http.get("/model_info", timeout=POLL_TIMEOUT_S)
            info = resp.json() if resp.status_code == 200 else {}
        except Exception:  # noqa: BLE001 - down, restarting, or answering garbage: not up
            return InstanceState(endpoint)
        if not isinstance(info, dict) or not isinstance(info.get(PLUGIN_MARKER), dict):
            return InstanceState(endpoint)
        self.session.asked["info"] = info  # the update's layout check reads the server's current answer
        plugin = info[PLUGIN_MARKER]
        return InstanceState(endpoint, True, str(plugin.get("weights_state", "")), info.get("weight_version"))

    def decide(self, states: list[InstanceState]) -> Action:
        """Rank 0: the newest ready checkpoint newer than the one served (older ones it supersedes are passed
        over), or a refill of the instances that are behind."""
        newer = [
            c
            for c in self.watch.ready()
            if (self.serving is None or c.order > self.serving.order) and (c.path, c.signature) not in self.skipped
        ]
        for c in newer[:-1]:
            if c.path not in self.passed_over:
                self.passed_over.add(c.path)
                self.say(f"passing over {c.version}: {newer[-1].version} is newer")
        now = time.monotonic()
        may_refill = [self.retry_at.get(i, 0.0) <= now for i in range(len(states))]
        self.newest = newer[-1] if newer and now >= self.push_retry_at else None  # a failed push waits its turn
        return choose_action(self.newest, self.serving, states, may_refill)

    def agree(self, action: Action | None) -> Action:
        text = self.control.broadcast_str(json.dumps(asdict(action)) if action is not None else "")
        fields = json.loads(text)
        return Action(fields["kind"], fields["path"], fields["version"], tuple(fields["instances"]))

    # ------------------------------------------------------------------ one update
    def execute(self, action: Action, states: list[InstanceState]) -> None:
        candidate = self.newest  # rank 0's record of a pushed checkpoint (the other ranks only follow)
        receivers = [r for r in self.session.route.feeding.feeders if self.world.instance_of(r) in action.instances]
        args = self.args.for_checkpoint(action.path, action.version)
        where = ", ".join(states[i].endpoint for i in action.instances)
        self.say(f"{action.kind}: {action.version} to {where}")
        self.in_progress = action
        self.write_status(states)
        t0 = time.monotonic()
        error: BaseException | None = None
        watchdog.arm(args.timeout)
        try:
            self.session.update(args, receivers).run()
        except (PeerFailed, *UPDATE_ERRORS) as exc:
            error = exc
        finally:
            watchdog.disarm()
            self.in_progress = None
        if error is not None and (broken := self.control.data_group_broken()) is not None:
            raise PeerFailed(
                f"the loader group's NCCL communicator failed ({broken}); the group stops so that torchrun's "
                "--max-restarts starts it again with a new one (the instances keep what they served)"
            ) from error
        took = time.monotonic() - t0
        if action.kind == "push":
            if error is None:
                self.serving = candidate
                if candidate is not None:  # rank 0 keeps the record
                    self.failed_pushes.pop((candidate.path, candidate.signature), None)
                self.say(f"serving {action.version} on {where} ({took:.3f} s)")
            elif self.world.rank == 0:
                self.push_failed(candidate, action.version, error)
            return
        for i in action.instances:
            if error is None:
                self.last_refill_s[i] = time.monotonic() - self.up_since.get(i, t0)
                self.say(
                    f"refilled {states[i].endpoint} with {action.version}: serving {self.last_refill_s[i]:.2f} s "
                    "after this loader first saw its /model_info answer"
                )
            else:
                self.retry_at[i] = time.monotonic() + REFILL_RETRY_S
        if error is not None:
            self.say(f"refill of {where} failed: {error} (tried again in {REFILL_RETRY_S:g} s)")

    def push_failed(self, candidate: Candidate, version: str, error: BaseException) -> None:
        """Rank 0. A push fails for the checkpoint's sake (the servers refuse it) or for the moment's (a server went
        down, a loader rank was lost mid-update, and an instance may have committed while another did not): it is
        tried again after REFILL_RETRY_S, and skipped once it failed PUSH_ATTEMPTS times. Skipping at once would
        leave a fleet that committed on some instances split across two versions until the next checkpoint."""
        key = (candidate.path, candidate.signature)
        self.failed_pushes[key] = attempts = self.failed_pushes.get(key, 0) + 1
        if attempts >= PUSH_ATTEMPTS:
            self.skipped[key] = str(error)
            self.say(
                f"skipped {version}: {error} (failed {attempts} times; the instances keep what they served; the "
                "directory is tried again once its files change)"
            )
            return
        self.push_retry_at = time.monotonic() + REFILL_RETRY_S
        self.say(
            f"push of {version} failed (attempt {attempts} of {PUSH_ATTEMPTS}): {error}; tried again in "
            f"{REFILL_RETRY_S:g} s"
        )

    # ------------------------------------------------------------------ status
    def write_status(self, states: list[InstanceState], stopped: bool = False) -> None:
        """Rank 0: the status file, replaced atomically (a reader never sees half of it)."""
        if self.world.rank != 0 or not self.args.status_file:
            return
        serving = self.serving
        status = {
            "watching": str(self.args.watch),
            "pid": os.getpid(),
            "stopped": stopped,
            "serving": {"version": serving.version, "path": serving.path} if serving else None,
            "in_progress": asdict(self.in_progress) if self.in_progress else None,
            "instances": [{**asdict(s), "last_refill_s": self.last_refill_s.get(i)} for i, s in enumerate(states)],
            "skipped": [{"path": path, "reason": why} for (path, _), why in self.skipped.items()],
            "passed_over": sorted(self.passed_over),
            "updated_at": time.time(),
        }
        tmp = f"{self.args.status_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(status, f, indent=1)
        os.replace(tmp, self.args.status_file)
