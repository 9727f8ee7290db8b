"""The --verify checksum for GPU buffers (transport/word_sums.py): the host's streaming numpy sums and torch's
sums on the tensor give one value, and it sees the corruptions verification is for."""

import random

import numpy as np
import pytest
import torch

from sglang_ckpt_plugin.transport.word_sums import ROW_WORDS, WordSums, device_digest, host_digest

SIZES = [0, 1, 7, 8, 9, 8 * ROW_WORDS, 8 * ROW_WORDS + 3, 3 * 8 * ROW_WORDS + 8 * 17 + 5, 1 << 20]


@pytest.mark.parametrize("nbytes", SIZES)
def test_host_pieces_and_device_sums_agree(nbytes):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    expected = host_digest(data)
    rng = random.Random(nbytes)
    for _ in range(3):  # the loader's staging chunks cut tensors anywhere
        sums, at = WordSums(), 0
        while at < nbytes:
            step = rng.choice([1, 3, 8, 13, 8 * ROW_WORDS - 5, 8 * ROW_WORDS + 8, 50_000])
            sums.update(data[at : at + step])
            at += step
        assert sums.intdigest() == expected
    assert (
        device_digest(
            torch.frombuffer(bytearray(data), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        )
        == expected
    )


def test_a_view_at_an_unaligned_offset_gives_the_same_value():
    buf = torch.randint(0, 256, (3 * 8 * ROW_WORDS + 11,), dtype=torch.uint8)
    view = buf[3:]
    assert device_digest(view) == host_digest(bytes(view.numpy()))


def test_values_that_wrap_around_agree():
    words = np.full(5 * ROW_WORDS + 3, np.iinfo(np.uint64).max, dtype=np.uint64)
    data = words.tobytes()
    assert device_digest(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == host_digest(data)


def test_the_checksum_sees_changed_swapped_and_shifted_bytes():
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 8 * ROW_WORDS * 6 + 40, dtype=np.uint8)
    base = host_digest(data.tobytes())
    one = data.copy()
    one[12345] ^= 1
    words = data.view(np.uint64)
    swapped_words = words.copy()
    swapped_words[[3, 900]] = swapped_words[[900, 3]]
    swapped_rows = words[: 6 * ROW_WORDS].reshape(6, ROW_WORDS).copy()
    swapped_rows[[1, 4]] = swapped_rows[[4, 1]]
    cancelling = words.copy()  # +1 and -1 in the same column of two rows: total and by_col unchanged
    cancelling[5] += np.uint64(1)
    cancelling[5 + 2 * ROW_WORDS] -= np.uint64(1)
    variants = [
        one.tobytes(),
        swapped_words.tobytes(),
        swapped_rows.tobytes() + data[6 * 8 * ROW_WORDS :].tobytes(),
        cancelling.tobytes(),
        data[1:].tobytes(),
        data.tobytes() + b"\0",
    ]
    digests = [host_digest(v) for v in variants]
    assert base not in digests and len(set(digests)) == len(digests)
