"""A loader run: its process world and what every update of the run shares (``Session``), then the updates.

One-shot: the rounds of ``--update-method`` (run.py ``Update`` each). Resident (``--watch``): resident.py, with the
same session between updates.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ..placement import LoaderPlacement, shared_gpus
from .checkpoint import discover_files
from .early_read import EarlyRead
from .options import LoaderOptions
from .rank_setup import PeerFailed, agree_on_kind, place_rank, torch_device
from .resident import Resident
from .route import Route
from .run import UPDATE_ERRORS, Update, update_rounds
from .world import Control, LoaderWorld


@dataclass
class Session:
    """What every update of one loader run shares: the process world, its groups, the route (who feeds which server
    rank, how the bytes travel), where the buffers live, and each leader's server client (``asked``)."""

    world: LoaderWorld
    control: Control
    route: Route
    placement: LoaderPlacement
    rank_keys: list[str]  # the server ranks this process feeds
    asked: dict

    def update(self, args: LoaderOptions, receivers: list[int]) -> Update:
        return Update(args, self.world, self.control, self.placement, self.route, self.rank_keys, receivers, self.asked)


def open_session(args: LoaderOptions, world: LoaderWorld, control: Control) -> Session:
    asked: dict = {}  # the leader's client and /model_info, read once
    route, placements, own = place_rank(args, world, control, asked)
    placement = agree_on_kind(own, control, world)
    if placement.kind == "cuda":  # before the first NCCL call, which would fail on a shared GPU
        torch_device(placement)
        problem = shared_gpus(
            list(zip(control.all_gather_int(world.node_rank), control.all_gather_str(placement.rank_key)))
        )
        if problem:
            raise ValueError(problem)
        control.use_nccl()
    return Session(world, control, route, placement, [p.rank_key for p in placements], asked)


def run_loader(args: LoaderOptions, early: EarlyRead | None = None, t_start: float | None = None) -> int:
    """The loader process: set up, then one run of updates (or stay, ``--watch``); the exit code. ``early``: the
    read-ahead cli.main started before it waited for the server; ``t_start``: when the loader started."""
    control = None
    t_start = t_start or time.perf_counter()
    try:
        world = LoaderWorld.from_env(args.inference_parallel_size, args.feeds_instance)
        if args.checkpoint_path and not args.load_metas_file:
            discover_files(args.checkpoint_path)  # a wrong path fails at once, before waiting for any server
            if args.draft_checkpoint_path:
                discover_files(args.draft_checkpoint_path)
        early = early or EarlyRead.for_rank(args, world)
        if early is not None:
            early.start()
        control = Control(world, args.timeout)
        try:
            session = open_session(args, world, control)
        finally:
            if early is not None:
                early.report(world)  # the server answered (or never will): the push reads from here on
        t_answered = time.perf_counter()
        if args.watch:
            return Resident(args, session).run()
        for receivers in update_rounds(args.update_method, args.ranks, world, session.route.feeding):
            session.update(args, receivers).run()
        if world.rank == 0:
            serving_s, waited_s = time.perf_counter() - t_start, t_answered - t_start
            print(
                f"[sglang-ckpt] ready: the server serves these weights {serving_s:.3f} s after the loader started, "
                f"{waited_s:.3f} s of it waiting for the server to answer"
            )
        if args.sleep_time:
            time.sleep(args.sleep_time)
        return 0
    except PeerFailed as exc:
        print(f"[sglang-ckpt] stopped: {exc}", file=sys.stderr)
        return 1
    except UPDATE_ERRORS as exc:
        print(f"[sglang-ckpt] error: {exc}", file=sys.stderr)
        return 1
    finally:
        if control is not None:
            control.close()
