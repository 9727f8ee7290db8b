"""``--timeout`` as a hard ceiling: past it (plus a grace for clean-up) every thread's stack is printed to stderr
and the process exits 1. SIGUSR1 prints the stacks at any time. A one-shot run arms it once for the whole
process; a resident loader (``--watch``) arms it for each update and disarms it while it waits."""

from __future__ import annotations

import faulthandler
import signal

GRACE_S = 30.0


def install(timeout_s: float, grace_s: float = GRACE_S) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    arm(timeout_s, grace_s)


def arm(timeout_s: float, grace_s: float = GRACE_S) -> None:
    faulthandler.dump_traceback_later(timeout_s + grace_s, exit=True)


def disarm() -> None:
    faulthandler.cancel_dump_traceback_later()
