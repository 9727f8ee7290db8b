"""Limits and defaults the docs promise (protocol.md, reference.md), each checked where it is enforced."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import zmq

from sglang_ckpt_plugin.loader.cli import parse_args
from sglang_ckpt_plugin.loader.plan import staging_budget
from sglang_ckpt_plugin.server import staging
from sglang_ckpt_plugin.transport import fdpass
from sglang_ckpt_plugin.transport.channel import MAX_MESSAGE_BYTES, Channel, PeerGone, make_endpoint
from sglang_ckpt_plugin.transport.messages import Finish, encode


def test_a_frame_over_32_mib_is_never_delivered_and_a_frame_under_it_is():
    """protocol.md: every message is one frame of at most 32 MiB (ZMQ_MAXMSGSIZE). libzmq drops a peer that sends
    more, before any of it reaches the decoder."""
    assert MAX_MESSAGE_BYTES == 32 << 20
    ep = make_endpoint("frame-cap", "t")
    with Channel(ep, bind=True) as rank:
        peer = zmq.Context.instance().socket(zmq.PAIR)
        try:
            peer.connect(ep)
            peer.send(b" " * (MAX_MESSAGE_BYTES + 1))
            with pytest.raises((PeerGone, TimeoutError)):
                rank.recv(3)
        finally:
            peer.close(linger=0)
    ep = make_endpoint("frame-under-cap", "t")
    with Channel(ep, bind=True) as rank:
        peer = zmq.Context.instance().socket(zmq.PAIR)
        try:
            peer.connect(ep)
            frame = encode(Finish(seq=3))
            peer.send(frame + b" " * (MAX_MESSAGE_BYTES - len(frame)))  # JSON allows the trailing blanks
            assert rank.recv(10) == Finish(seq=3)
        finally:
            peer.close(linger=0)


def _fork_as_nobody(target) -> int:
    """Start ``target()`` in a child process under another user (uid 65534); its pid. It exits 0 if ``target``
    returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            target()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another user")
def test_descriptors_go_only_to_a_peer_of_the_same_user():
    """protocol.md: both sides check that the peer runs as the same user (SO_PEERCRED), beyond the socket's 0600."""
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="peercred-"))  # pytest's own are 0700: the other user could not reach it
    os.chmod(tmp_path, 0o777)
    try:
        _check_both_sides(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_both_sides(tmp_path) -> None:
    path = str(tmp_path / "offer.fds")
    r, w = os.pipe()
    offer = fdpass.FdOffer(path, [r], timeout_s=10)
    try:
        os.chmod(path, 0o666)  # the file mode alone would let the other user in

        def take():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
                assert fds == [], "descriptors went to another user"

        assert _exit_code(_fork_as_nobody(take)) == 0
        threading.Event().wait(0.3)
        assert offer.error == "a process of another user connected for the descriptors; refused"
    finally:
        offer.close()
        os.close(r)
        os.close(w)

    # the rank's side: a socket file of this user behind which another user's process listens
    served = str(tmp_path / "theirs.fds")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(served)  # the file is this user's; the process listening behind it (its credentials) is not

    listening_r, listening_w = os.pipe()

    def serve():
        listener.listen(1)
        os.write(listening_w, b"L")
        conn, _ = listener.accept()
        conn.close()

    pid = _fork_as_nobody(serve)
    listener.close()
    assert os.read(listening_r, 1) == b"L"
    os.close(listening_r)
    os.close(listening_w)
    try:
        with pytest.raises(ValueError, match="runs as another user"):
            fdpass.receive_fds(served, 1, timeout_s=5)
    finally:
        assert _exit_code(pid) == 0


def test_the_staging_budget_defaults_to_80_percent_of_available_memory():
    """reference.md: --staging-budget defaults to 80% of MemAvailable; given, it is what it says."""
    assert parse_args(["--checkpoint-path", "x"]).staging_budget == 0
    assert staging_budget(0, 10_000) == 8_000
    assert staging_budget(parse_args(["--checkpoint-path", "x", "--staging-budget", "8K"]).staging_budget, 1) == 8192


def test_a_staged_update_waits_600_s_for_its_commit_unless_told_otherwise(monkeypatch):
    """reference.md: SGLANG_CKPT_STAGED_TIMEOUT, default 600 s."""
    monkeypatch.delenv(staging.STAGED_TIMEOUT_ENV, raising=False)
    assert staging.staged_timeout_s() == 600
    monkeypatch.setenv(staging.STAGED_TIMEOUT_ENV, "15")
    assert staging.staged_timeout_s() == 15
