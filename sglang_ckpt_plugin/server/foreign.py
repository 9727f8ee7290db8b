"""Recognise checkpoint-engine's ParameterServer at an endpoint, and answer it in words it shows its user.

SGLang's docs tell users to push with ``python -m sglang.srt.checkpoint_engine.update``; with the
checkpoint-engine package installed, its ParameterServer calls this server's ``/update_weights_from_ipc`` with
``zmq_handles`` naming abstract sockets (``ipc://@checkpoint-engine-<uuid>-<n>.sock``) on which it has bound a
REQ socket, and sends a pickled CUDA IPC handle as its first frame. Our receiver speaks a typed protocol on
sockets in a private directory, so it would only say "refusing endpoint". Here the first frame is read as raw
bytes (bounded in size, never unpickled: it is recognised by pickle's opening PROTO opcode) and answered the way
checkpoint-engine's own worker reports an error (a text reply, which its ParameterServer logs and raises on),
so the user sees what to run instead.
"""

from __future__ import annotations

import zmq

CHECKPOINT_ENGINE_REFUSAL = (
    "this SGLang server runs sglang-ckpt-plugin, which does not take checkpoint-engine's ParameterServer protocol "
    "(pickled CUDA IPC handles: nothing read from a socket is unpickled here). Push with "
    "`python -m sglang_ckpt_plugin.update` instead: the same options work (--checkpoint-path, "
    "--inference-parallel-size, --endpoint, --update-method, --weight-version, under torchrun or self-launched)"
)
SNIFF_TIMEOUT_S = 5.0
MAX_FIRST_FRAME = 1 << 20  # a pickled CUDA IPC handle is a few hundred bytes


def looks_like_pickle(frame: bytes) -> bool:
    """Pickle protocols 2-5 open with the PROTO opcode (0x80) and the protocol number."""
    return len(frame) >= 2 and frame[0] == 0x80 and 2 <= frame[1] <= 5


def may_be_checkpoint_engine(endpoint: str) -> bool:
    """checkpoint-engine binds abstract Unix sockets; ours are files in a private directory, never abstract."""
    return endpoint.startswith("ipc://@")


def answer_checkpoint_engine(endpoint: str, timeout_s: float = SNIFF_TIMEOUT_S) -> bool:
    """Connect as checkpoint-engine's workers do (REP), read the first frame; if it is a pickle, reply with
    ``CHECKPOINT_ENGINE_REFUSAL`` and return True. False: nothing arrived in time, or something else did."""
    if not may_be_checkpoint_engine(endpoint):
        return False
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 1000)  # let the reply leave before the socket closes
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FIRST_FRAME)
    try:
        sock.connect(endpoint)
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return False
        first = sock.recv(zmq.NOBLOCK)  # bytes; never unpickled
        if not looks_like_pickle(first):
            return False
        sock.send_string(CHECKPOINT_ENGINE_REFUSAL, zmq.NOBLOCK)
        if sock.poll(1000, zmq.POLLIN):  # its ParameterServer answers an error reply with a pickled exception:
            sock.recv(zmq.NOBLOCK)  # taken off the socket and dropped, unread
        return True
    except zmq.ZMQError:
        return False
    finally:
        sock.close()
        ctx.term()
