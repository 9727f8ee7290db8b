"""What runs and what is left on this machine, read from /proc and the plugin's own names: the processes of a
server or a torchrun agent, and the shared-memory segments and socket files of ours that still exist. Used by the
tests, the benches and the kill script to stop what they started and to check that nothing leaked."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ..transport.channel import socket_dir
from ..transport.handles import SHM_DIR, SHM_PREFIX


def _stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, process group) of every process still listed."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        found.append((int(entry.name), state, int(ppid), int(pgrp)))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    return [pid for pid, state, _, pgrp in _stats() if pgrp == pgid and state != "Z"]


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (a torchrun agent's workers run in their own sessions: killing the agent's
    group misses them)."""
    return [child for child, state, ppid, _ in _stats() if ppid == pid and state != "Z"]


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_torchrun_group(agents: list[subprocess.Popen]) -> None:
    """SIGKILL torchrun agents and the workers each started (in their own sessions), then reap the agents."""
    for agent in agents:
        if agent.poll() is None:
            for pid in children_of(agent.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait()


def scheduler_pids(server_pid: int) -> list[int]:
    """The scheduler processes (one per server rank) of a server started in its own session (SGLang titles them)."""
    found = []
    for pid in group_members(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "scheduler" in cmdline:
            found.append(pid)
    return sorted(found)


def our_leftovers() -> list[str]:
    """Shared-memory segments and socket files of ours that still exist."""
    shm = [f"{SHM_DIR}/{n}" for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)]
    socks = [str(p) for p in socket_dir().iterdir()]
    return shm + socks
