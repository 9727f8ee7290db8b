"""What moves the buckets of a p2p update (``--p2p-transport``), decided once per update and agreed by every rank:
torch.distributed send/recv (exchange.py; the default) or Mooncake one-sided reads (transport/mooncake.py).

Broadcast updates always move over torch.distributed (a collective reaches every rank at once). A p2p update
(``--update-method p2p``, the p2p part of ``all``, a join from a metas file) takes Mooncake where asked
(``mooncake``: an engine that cannot start on any rank fails the update before any byte moves), or with ``auto``
where every rank can start it and the buckets are in host memory (otherwise every rank falls back to
torch.distributed). Rank 0 prints the choice and the reason.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..transport.mooncake import MooncakeEngine, default_protocol, local_address, unavailable
from .world import Control, LoaderWorld


@dataclass
class MooncakeLink:
    """This rank's engine, every rank's session name, and the control group the ranks agree over."""

    engine: MooncakeEngine
    sessions: list[str]
    control: Control

    def close(self) -> None:
        self.engine.close()


def open_link(
    wanted: str, receivers: list[int], world: LoaderWorld, control: Control, buffers_on: str
) -> MooncakeLink | None:
    """Collective: the Mooncake link every rank uses for this update, or None (torch.distributed moves it)."""
    if not world.distributed or set(receivers) == set(range(world.world_size)):
        return None  # nothing moves between processes, or a broadcast
    why_not = _why_not(wanted, buffers_on)
    engine = None
    if why_not is None:
        try:
            engine = MooncakeEngine(local_address(os.environ.get("MASTER_ADDR", "127.0.0.1")), default_protocol())
        except OSError as exc:
            why_not = str(exc)
    if control.any_failed(why_not is not None):
        if engine is not None:
            engine.close()
        reason = why_not or "another loader rank could not start its engine (its error is printed there)"
        if wanted == "mooncake":
            raise ValueError(f"--p2p-transport mooncake: {reason}")
        _say(world, f"p2p transport: torch.distributed send/recv ({reason})")
        return None
    sessions = control.all_gather_str(engine.session)
    _say(world, f"p2p transport: Mooncake Transfer Engine, {engine.protocol} one-sided reads")
    return MooncakeLink(engine, sessions, control)


def _why_not(wanted: str, buffers_on: str) -> str | None:
    if wanted == "torch":
        return "--p2p-transport torch"
    if wanted == "auto" and buffers_on != "cpu":
        return "the buckets are in GPU memory: NCCL moves them (--p2p-transport mooncake needs Mooncake's CUDA build)"
    return unavailable()


def _say(world: LoaderWorld, line: str) -> None:
    if world.rank == 0:
        print(f"[sglang-ckpt] {line}", file=sys.stderr, flush=True)
