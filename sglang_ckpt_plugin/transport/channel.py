"""ZeroMQ channel between one loader rank and one inference rank, and where its endpoints live.

Endpoints are ``ipc://`` sockets inside a private directory (mode 0700, owned by the user), so only the
same user can connect: ``$SGLANG_CKPT_SOCKET_DIR``, else ``$XDG_RUNTIME_DIR/sglang-ckpt``, else
``/tmp/sglang-ckpt-<uid>``. The loader binds (and removes the socket file when it closes); the inference rank
connects. PAIR sockets: both sides may send at any time, one peer each.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
import time
from pathlib import Path

import zmq

from .messages import Message, ProtocolError, decode, encode

MAX_MESSAGE_BYTES = 32 << 20  # a hello's manifest of MAX_TENSORS entries fits; anything larger is not ours
# A reply sent just before close() (the rank's last answer, an error before it gives up) is only queued; with no
# linger libzmq drops it, and the peer sees a disconnect instead of the answer (a quarter of the time under load).
CLOSE_LINGER_MS = 2000
DRAIN_AFTER_DISCONNECT_MS = 200


def socket_dir() -> Path:
    """The private socket directory, created 0700 if missing; refuses one that others could enter."""
    if os.environ.get("SGLANG_CKPT_SOCKET_DIR"):
        path = Path(os.environ["SGLANG_CKPT_SOCKET_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "sglang-ckpt"
    else:
        path = Path(tempfile.gettempdir()) / f"sglang-ckpt-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"socket directory {path} must be a directory owned by uid {os.getuid()} with mode 0700; "
            "fix or remove it, or set SGLANG_CKPT_SOCKET_DIR"
        )
    return path


def make_endpoint(update_id: str, rank_key: str) -> str:
    """Short names: a Unix socket path must stay under 108 bytes (GPU uuids alone are 40)."""
    key = rank_key if len(rank_key) <= 16 else hashlib.sha1(rank_key.encode()).hexdigest()[:16]
    return f"ipc://{socket_dir()}/{update_id[-24:].lstrip('-_')}-{key}.sock"


def check_endpoint(endpoint: str) -> str:
    """Server side: accept only a live socket, owned by this user, directly inside our private directory
    (``lstat``: a symlink or a plain file is refused), so a bad name fails at once instead of at a timeout."""
    prefix = f"ipc://{socket_dir()}/"
    name = endpoint[len(prefix) :] if endpoint.startswith(prefix) else ""
    if not name.endswith(".sock") or "/" in name or name.startswith(".") or "\0" in name:
        raise ProtocolError(f"refusing endpoint {endpoint!r}: must be an ipc socket in {prefix}")
    try:
        st = os.lstat(endpoint.removeprefix("ipc://"))
    except OSError:
        raise ProtocolError(f"refusing endpoint {endpoint!r}: no such socket (has the loader bound it?)") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise ProtocolError(f"refusing endpoint {endpoint!r}: not a socket owned by uid {os.getuid()}")
    return endpoint


class PeerGone(ConnectionError):
    """The other side's connection closed mid-conversation (its process died or gave up)."""


class Channel:
    """One PAIR socket plus a socket monitor, so that a peer that dies is noticed at once, not at a timeout."""

    def __init__(self, endpoint: str, bind: bool):
        self.endpoint = endpoint
        # the process's one context: a context per channel cost a millisecond to terminate at every update's end
        self._sock = zmq.Context.instance().socket(zmq.PAIR)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._peer_seen = False
        self._gone = False  # the peer disconnected; what it sent before is still delivered
        self._bound = bind
        if bind:
            self._sock.bind(endpoint)
        else:
            self._sock.connect(endpoint)

    def _check_peer(self) -> None:
        while self._monitor.poll(0):
            # libzmq's monitor message: 16-bit event id + 32-bit value, then the endpoint (parsed here: pyzmq's
            # helper imports asyncio, a tenth of the one-rank loader's start-up)
            event = struct.unpack("=H", self._monitor.recv_multipart()[0][:2])[0]
            if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._peer_seen = True
            elif event == zmq.EVENT_DISCONNECTED and self._peer_seen:
                self._gone = True

    def send(self, msg: Message, timeout_s: float = 30.0) -> None:
        """Send one message; TimeoutError if no peer takes it in ``timeout_s`` (a PAIR waits for its peer).

        Never a blocking send: the peer can go between ``poll`` saying writable and the send, and a PAIR
        without a peer would then block forever (seen as a loader hung in ``abort``)."""
        frame = encode(msg)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLOUT):
                try:
                    return self._sock.send(frame, flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:  # the peer left after poll
                    time.sleep(0.01)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no peer took a message on {self.endpoint} within {timeout_s:g} s")

    def recv(self, timeout_s: float) -> Message:
        """Next message. TimeoutError if none arrives in ``timeout_s``; PeerGone as soon as the peer
        disconnects (messages it sent before are still delivered first); bad frames raise ProtocolError."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._gone:
                # the monitor can report the disconnect before the socket shows the peer's last messages (its
                # answer, sent just before it closed): deliver what it sent first
                if self._sock.poll(DRAIN_AFTER_DISCONNECT_MS, zmq.POLLIN):
                    return decode(self._sock.recv(flags=zmq.NOBLOCK, copy=True))
                raise PeerGone(f"the peer on {self.endpoint} disconnected (its process ended or gave up)")
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._sock in ready:
                try:
                    return decode(self._sock.recv(flags=zmq.NOBLOCK, copy=True))
                except zmq.Again:
                    continue
            if self._monitor in ready:
                self._check_peer()
            elif time.monotonic() >= deadline:
                raise TimeoutError(f"no message on {self.endpoint} within {timeout_s:g} s")

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=CLOSE_LINGER_MS)  # returns at once; libzmq delivers what is queued in the background
        if self._bound:  # libzmq usually removes it; make sure
            try:
                os.unlink(self.endpoint.removeprefix("ipc://"))
            except FileNotFoundError:
                pass

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
