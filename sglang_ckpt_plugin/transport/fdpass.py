"""Hand open file descriptors (checkpoint files, unnamed shared memory) from a loader to one inference rank, and
back: the buffers a server rank keeps between updates go to the loader that fills them (FdInbox, send_fds_to).

The descriptors travel over a Unix stream socket next to the ZeroMQ endpoint (``<name>.fds`` in the private
socket directory) with ``SCM_RIGHTS``: the rank receives the very files the connected loader holds open, so a
message cannot point it at another process's descriptors (as ``/proc/<pid>/fd/<n>`` could). Both sides check
that the peer runs as the same user (``SO_PEERCRED``). One connection, one batch of descriptors, then done.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

MAX_FDS = 253  # SCM_MAX_FD on Linux


def fd_socket_path(endpoint: str, suffix: str = ".fds") -> str:
    """``ipc://<dir>/<name>.sock`` -> ``<dir>/<name>.fds`` (or another suffix: ``.kept`` for FdInbox)."""
    return endpoint.removeprefix("ipc://").removesuffix(".sock") + suffix


KEPT_SUFFIX = ".kept"


def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _listen(path: str) -> socket.socket:
    """A private (0600) listening socket at ``path``, for one peer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(1)
    return sock


def _close_listener(sock: socket.socket, path: str) -> None:
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _connect_to_own(path: str, timeout_s: float) -> socket.socket:
    """Connect to ``path``, a socket of this user whose listener runs as this user; ValueError otherwise."""
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(f"{path} is not a socket of this user")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(path)
        if _peer_uid(sock) != os.getuid():
            raise ValueError(f"the process behind {path} runs as another user")
    except BaseException:
        sock.close()
        raise
    return sock


def _exactly(fds: list[int], count: int, sender: str) -> list[int]:
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"{sender} handed over {len(fds)} descriptors, it announced {count}")
    return fds


class FdOffer:
    """Loader side: serves ``fds`` once, to the first peer of the same user that connects."""

    def __init__(self, path: str, fds: list[int], timeout_s: float):
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors to hand over; at most {MAX_FDS} fit in one message")
        self.path = path
        self.error: str | None = None
        self._sock = _listen(path)
        self._sock.settimeout(0.2)
        self._fds = list(fds)
        self._deadline = time.monotonic() + timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fd-offer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                if _peer_uid(conn) != os.getuid():
                    self.error = "a process of another user connected for the descriptors; refused"
                    continue
                try:
                    socket.send_fds(conn, [b"F"], self._fds)
                except OSError as exc:
                    self.error = f"handing over descriptors failed: {exc}"
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        _close_listener(self._sock, self.path)


def receive_fds(path: str, count: int, timeout_s: float) -> list[int]:
    """Rank side: the ``count`` descriptors the loader offers at ``path``. OSError/ValueError on anything odd."""
    if not 0 < count <= MAX_FDS:
        raise ValueError(f"the loader announced {count} descriptors; 1..{MAX_FDS} expected")
    with _connect_to_own(path, timeout_s) as sock:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, count)
    return _exactly(fds, count, "the loader")


class FdInbox:
    """Loader side: receives descriptors a server rank sends (its kept buffers), from the first peer of the same
    user that connects. Listening from construction, so the rank may connect as soon as it was asked."""

    def __init__(self, path: str):
        self.path = path
        self._sock = _listen(path)

    def receive(self, count: int, timeout_s: float) -> list[int]:
        """The ``count`` descriptors; TimeoutError or ValueError when they do not come as announced."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            conn, _ = self._sock.accept()  # TimeoutError past the deadline
            with conn:
                if _peer_uid(conn) != os.getuid():
                    continue  # another user's process: not the rank we asked
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, MAX_FDS)
            return _exactly(fds, count, "the server's rank")

    def close(self) -> None:
        _close_listener(self._sock, self.path)


def send_fds_to(path: str, fds: list[int], timeout_s: float) -> None:
    """Rank side: hand ``fds`` to the loader's FdInbox at ``path`` (the checks of receive_fds)."""
    with _connect_to_own(path, timeout_s) as sock:
        socket.send_fds(sock, [b"K"], fds)
