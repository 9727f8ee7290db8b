"""Buffers a server rank keeps between updates (--keep-update-buffers): a real loader (NodeFeeder, RankFeeder) and a
real ReceiveSession in one process, over a real channel and real descriptors."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from sglang_ckpt_plugin.server.kept_buffers import BuffersBusy, KeptBuffers, layout
from sglang_ckpt_plugin.server.receiver import UpdateFailed
from sglang_ckpt_plugin.transport.channel import socket_dir
from sglang_ckpt_plugin.transport.fdpass import FdInbox, send_fds_to
from sglang_ckpt_plugin.transport.handles import LentFile

from .conftest import our_leftovers
from .inproc_session import run_session
from .test_transport import Tiny, checkpoint  # noqa: F401 - the fixture

PAGE = mmap.PAGESIZE


def served(model) -> dict[str, torch.Tensor]:
    return {name: p.data.clone() for name, p in model.named_parameters()}


def test_buffers_are_laid_out_page_aligned_one_after_another():
    offsets, nbytes = layout([100, PAGE, PAGE + 1])
    assert offsets == [0, PAGE, 2 * PAGE] and nbytes == 4 * PAGE


def test_a_loader_fills_the_ranks_kept_buffers_and_the_next_update_reuses_them(checkpoint, monkeypatch):  # noqa: F811
    from sglang_ckpt_plugin.server import receiver

    def mapped_again(*args):
        raise AssertionError("the rank mapped its own kept buffers again")

    monkeypatch.setattr(receiver, "open_buffer", mapped_again)  # the rank reads through the mapping it has
    ckpt_dir, state = checkpoint
    kept = KeptBuffers()
    before = set(our_leftovers())
    for _ in range(2):
        model = Tiny()
        stats, errors, n = run_session(ckpt_dir, model, kept=kept)
        assert errors == [] and stats.tensors == 3
        assert run_session.buffer_source == "kept by the server between updates, lent to this one"
        assert all(torch.equal(served(model)[k], v) for k, v in state.items())
        if _ == 0:
            identity, nbytes = kept.identity, kept.nbytes
    assert (kept.identity, kept.nbytes) == (identity, nbytes), "the second update allocated again"
    assert kept.holder is None, "the update ended and still holds the buffers"
    assert set(our_leftovers()) - before == set()


def test_buffers_held_by_a_staged_update_are_declined_and_the_loader_allocates_its_own(checkpoint):  # noqa: F811
    ckpt_dir, state = checkpoint
    kept = KeptBuffers()
    kept.lend([PAGE], holder="staged-update")
    with pytest.raises(BuffersBusy, match="held by another update"):
        kept.lend([PAGE], holder="someone")
    model = Tiny()
    _, errors, _ = run_session(ckpt_dir, model, kept=kept)
    assert errors == [] and all(torch.equal(served(model)[k], v) for k, v in state.items())
    assert run_session.buffer_source.startswith("allocated by the loader (the server lent none: the kept update")
    kept.give_back("staged-update")
    run_session(ckpt_dir, Tiny(), kept=kept)
    assert run_session.buffer_source.startswith("kept by the server")


def test_a_failed_update_gives_the_buffers_back(checkpoint):  # noqa: F811
    ckpt_dir, _ = checkpoint
    kept = KeptBuffers()

    def refuse(manifest, partial, allow_unused):
        raise ValueError("not this model's weights")

    with pytest.raises(UpdateFailed, match="not this model's weights"):
        run_session(ckpt_dir, Tiny(), kept=kept, validate=refuse)
    assert kept.holder is None
    kept.lend([PAGE], holder="next")


def test_a_model_that_keeps_a_view_retires_the_file_so_no_later_update_writes_under_it(checkpoint):  # noqa: F811
    ckpt_dir, state = checkpoint

    class Keeps(Tiny):
        kept_views = []

        def load_weights(self, weights):
            weights = list(weights)
            Keeps.kept_views.extend(weights)
            super().load_weights(weights)

    kept = KeptBuffers()
    with pytest.raises(UpdateFailed, match="kept a reference"):
        run_session(ckpt_dir, Keeps(), kept=kept)
    assert kept.identity is None and kept.nbytes == 0  # never lent again
    run_session(ckpt_dir, Tiny(), kept=kept)  # a new file for the next update
    name, view = Keeps.kept_views[0]
    assert torch.equal(view, state[name])  # the kept view still reads what it was given
    Keeps.kept_views.clear()


def test_growing_keeps_the_file_and_what_it_holds():
    kept = KeptBuffers()
    fd, offsets = kept.lend([PAGE], holder="a")
    os.pwrite(fd, b"kept", 0)
    identity = kept.identity
    kept.give_back("a")
    fd, offsets = kept.lend([PAGE, 3 * PAGE], holder="b")
    assert kept.identity == identity and kept.nbytes == 4 * PAGE and offsets == [0, PAGE]
    assert bytes(kept.view(0, 4).tensor.tolist()) == b"kept"
    with pytest.raises(ValueError, match="refusing kept-buffer range"):
        kept.view(1, 4)  # not page-aligned
    with pytest.raises(ValueError, match="refusing kept-buffer range"):
        kept.view(0, 5 * PAGE)  # past the file


def test_the_lent_file_reaches_the_loader_and_its_writes_reach_the_rank():
    kept = KeptBuffers()
    fd, offsets = kept.lend([PAGE, 100], holder="update")
    path = str(socket_dir() / "kept-test.kept")
    inbox = FdInbox(path)
    try:
        send_fds_to(path, [fd], timeout_s=5)
        (received,) = inbox.receive(1, timeout_s=5)
    finally:
        inbox.close()
    assert not os.path.exists(path)
    lent = LentFile(received, kept.nbytes, offsets, [PAGE, 100])
    lent.buffers[1].view[:3] = b"abc"
    assert bytes(kept.view(offsets[1], 3).tensor.tolist()) == b"abc"  # the same pages, no copy
    lent.release()
    with pytest.raises(ValueError, match="do not fit"):
        LentFile(os.dup(fd), kept.nbytes, [0], [kept.nbytes + 1])


def test_an_inbox_refuses_a_wrong_number_of_descriptors():
    kept = KeptBuffers()
    fd, _ = kept.lend([PAGE], holder="update")
    path = str(socket_dir() / "kept-count.kept")
    inbox = FdInbox(path)
    try:
        send_fds_to(path, [fd, fd], timeout_s=5)
        with pytest.raises(ValueError, match="handed over 2 descriptors"):
            inbox.receive(1, timeout_s=5)
    finally:
        inbox.close()
