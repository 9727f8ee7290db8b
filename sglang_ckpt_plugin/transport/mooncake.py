"""Mooncake Transfer Engine (``pip install 'sglang-ckpt-plugin[p2p]'``; checkpoint-engine's ``[p2p]`` extra): a
receiving loader rank reads a bucket straight out of its owner's registered buffer, one-sided, over RDMA where the
machine has RDMA devices and TCP otherwise. No metadata server: engines find each other by ``host:port`` session
names (``P2PHANDSHAKE``), which the ranks swap over their gloo control group.

An engine lives for one update: it registers the rank's bucket buffers, and ``close()`` unregisters them and
frees the engine (its threads and listening ports) whether the update succeeded or not. Its calls return a status
and never raise; a failed read becomes an ``OSError`` naming the peer.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PACKAGE_HINT = "pip install 'sglang-ckpt-plugin[p2p]' (Mooncake Transfer Engine; it needs libibverbs1 at import)"


def unavailable() -> str | None:
    """Why Mooncake cannot be used here (None: it imports)."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as exc:
        return f"{exc}; {PACKAGE_HINT}"
    return None


def default_protocol() -> str:
    """RDMA where the machine has RDMA devices, TCP otherwise (Mooncake itself falls back no further)."""
    devices = Path("/sys/class/infiniband")
    return "rdma" if devices.is_dir() and any(devices.iterdir()) else "tcp"


def local_address(peer: str) -> str:
    """This machine's address on the route to ``peer`` (e.g. torchrun's MASTER_ADDR): what the other nodes reach
    this engine at. A UDP connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 9))
        return probe.getsockname()[0]


class MooncakeEngine:
    def __init__(self, host: str, protocol: str):
        from mooncake.engine import TransferEngine

        self.protocol = protocol
        self._engine = TransferEngine()
        if self._engine.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
            self._engine = None
            raise OSError(f"Mooncake could not start a {protocol} transfer engine on {host}")
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []

    def register(self, buffers: list[tuple[int, int]]) -> None:
        """(address, bytes) of each buffer a peer may read from or this rank reads into."""
        if not buffers:
            return
        ptrs, sizes = [b[0] for b in buffers], [b[1] for b in buffers]
        if self._engine.batch_register_memory(ptrs, sizes) != 0:
            raise OSError(f"Mooncake could not register {len(ptrs)} bucket buffers ({sum(sizes)} bytes)")
        self._registered += ptrs

    def read(self, peer_session: str, local_ptr: int, remote_ptr: int, nbytes: int) -> None:
        """``nbytes`` from ``remote_ptr`` in the engine ``peer_session`` into ``local_ptr``; OSError if it failed."""
        if self._engine.transfer_sync_read(peer_session, local_ptr, remote_ptr, nbytes) != 0:
            raise OSError(
                f"Mooncake read of {nbytes} bytes from {peer_session} failed (the peer is gone, unreachable, or "
                f"did not answer within MC_TRANSFER_TIMEOUT={os.environ.get('MC_TRANSFER_TIMEOUT', '30')} s)"
            )

    def close(self) -> None:
        """Unregister every buffer and free the engine (threads, ports); safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        for ptr in self._registered:
            engine.unregister_memory(ptr)
        self._registered = []
        del engine
