"""A real SGLang server with pipeline stages and tensor parallelism (``--tp 2 --pp-size 2``: four schedulers, each
stage's two TP ranks holding their slices of half of the decoder layers) on dummy weights: one push fills both
stages, each stage's ranks write only what that stage holds, and a stage that refuses or fails changes what no
client is served.

SGLang's ``/weights_checker`` answers from the first stage only, so the evidence for the second stage is the
greedy output and its log-probabilities (which every layer and the ``lm_head`` shape), equal to those after
SGLang's own reload of the same files, and HF's teacher-forced second opinion. The server carries the test-only
fault plugin (tests/server_faults): a fault is consumed by the first stage that meets it.
"""

from __future__ import annotations

import httpx
import pytest
from safetensors.torch import save_file

from sglang_ckpt_plugin.demo import evidence

from .conftest import (
    NEW_TOKENS,
    PROMPT,
    assert_closed,
    assert_serves,
    fault_server,
    our_leftovers,
    plugin_info,
    push,
    serve_other,
)
from .test_e2e_tp2 import checkpoint_tensors, copied_per_rank

pytestmark = pytest.mark.slow

RANKS = ["cpu-pp0-tp0", "cpu-pp0-tp1", "cpu-pp1-tp0", "cpu-pp1-tp1"]
N = str(len(RANKS))
SECOND_STAGE = ("model.layers.1.", "model.norm.", "lm_head.")  # two decoder layers: the second stage holds layer 1


@pytest.fixture(scope="module")
def server(llama_a, fault_dir, tmp_path_factory):
    yield from fault_server(
        llama_a,
        fault_dir,
        tmp_path_factory,
        "pp2_server.log",
        tp_size=2,
        extra_args=["--pp-size", "2", "--sleep-on-idle"],
    )


def logprobs(url: str) -> list[float]:
    """Greedy log-probabilities of PROMPT, computed afresh (a prompt found in the radix cache is read back from the
    fp16 KV cache, which shifts them in the third decimal), once SGLang's own warm-up request no longer shares the
    batch (which shifts them in the last bits)."""
    evidence.wait_warmed_up(url)
    assert httpx.post(f"{url}/flush_cache", timeout=60).status_code == 200
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    out = httpx.post(f"{url}/generate", json=body, timeout=120).json()
    return [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]


def assert_every_stage_serves(url: str, checkpoint) -> None:
    """The first stage's checksums, and the output every stage shapes (log-probabilities to the last bit), equal
    those after SGLang's own reload of ``checkpoint``; leaves the server on that reload."""
    served = logprobs(url)
    assert_serves(url, checkpoint)
    assert logprobs(url) == served


def test_one_push_fills_every_stage_each_with_its_own_layers(server, llama_a, llama_b, tmp_path):
    closed = assert_closed(server.url)["ckpt_plugin"]
    assert (closed["tp_size"], closed["pp_size"], closed["rank_keys"]) == (2, 2, RANKS)
    assert [(r["pp_rank"], r["tp_rank"]) for r in closed["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    one = push(server.url, llama_b, "--inference-parallel-size", "2", check=False)
    assert one.returncode == 1 and "runs 4 rank(s) (tp 2 x pp 2)" in one.stderr, one.stderr[-2000:]

    # the first stage's tensors alone: it is written, the second stage is not, and the gate stays shut
    first = {n: t for n, t in checkpoint_tensors(llama_b).items() if not n.startswith(SECOND_STAGE)}
    (tmp_path / "first").mkdir()
    save_file(first, tmp_path / "first" / "model.safetensors", metadata={"format": "pt"})
    push(server.url, tmp_path / "first", "--inference-parallel-size", N, "--partial")
    state = assert_closed(server.url)["ckpt_plugin"]
    assert state["missing"] and all(name.startswith(SECOND_STAGE) for name in state["missing"]), state["missing"]

    out = push(server.url, llama_b, "--inference-parallel-size", N, "--weight-version", "pp-b")
    said = out.stdout + out.stderr
    assert "staged while the server kept serving, then committed" in said
    copied = copied_per_rank(said)
    assert list(copied) == RANKS and all(copied.values())
    # each stage's two TP ranks copy one half each of that stage's layers, and only those
    assert copied[RANKS[0]] == copied[RANKS[1]] != copied[RANKS[2]] == copied[RANKS[3]]
    assert "between loader processes: 0 bytes" in said
    assert plugin_info(server.url)["weights_state"] == "complete"
    assert_every_stage_serves(server.url, llama_b)

    push(server.url, llama_a, "--inference-parallel-size", N, "--two-phase", "off")  # streaming into both
    assert_every_stage_serves(server.url, llama_a)
    push(server.url, llama_b, "--inference-parallel-size", N, "--transfer", "copy", "--bucket-size", "300000")
    assert_every_stage_serves(server.url, llama_b)


def test_a_stage_that_refuses_changes_no_stage(server, fault_dir, llama_a, llama_b):
    serve_other(server.url, llama_a)  # SGLang's own reload: the push below must change what is served
    (fault_dir / "refuse-next-stage").touch()
    out = push(server.url, llama_b, "--inference-parallel-size", N, check=False)
    assert out.returncode != 0 and "stage refused by the test's fault" in out.stderr, out.stderr[-3000:]
    assert not (fault_dir / "refuse-next-stage").exists()
    assert plugin_info(server.url)["weights_loaded"] is True
    assert_every_stage_serves(server.url, llama_a)


def test_a_commit_that_fails_on_one_stage_shuts_the_gate_until_a_whole_update(server, fault_dir, llama_a, llama_b):
    """One stage commits llama_b, the other fails part-way: the model would be a mix, so nothing is served until a
    push of the whole model lands on both stages."""
    serve_other(server.url, llama_a)
    before = set(our_leftovers())
    (fault_dir / "fail-next-commit").touch()
    out = push(server.url, llama_b, "--inference-parallel-size", N, "--commit-retries", "0", check=False)
    assert out.returncode != 0 and "commit fault injected by the test" in out.stderr, out.stderr[-3000:]
    state = assert_closed(server.url)["ckpt_plugin"]
    assert state["weights_state"] == "incomplete" and state["missing_count"] > 0
    push(server.url, llama_b, "--inference-parallel-size", N)
    assert_every_stage_serves(server.url, llama_b)
    assert set(our_leftovers()) - before == set()


def test_a_retried_commit_loads_again_only_where_it_failed(server, fault_dir, llama_a, llama_b):
    """The ranks that committed hold the update and load nothing again; the one that failed loads its staged
    bytes; then every stage serves the pushed checkpoint."""
    serve_other(server.url, llama_a)
    (fault_dir / "fail-next-commit").touch()
    out = push(server.url, llama_b, "--inference-parallel-size", N, "--commit-retries", "1")
    said = out.stdout + out.stderr
    assert "retrying from the staged bytes" in said and "commit fault injected by the test" in said, said[-3000:]
    assert plugin_info(server.url)["weights_state"] == "complete"
    assert_every_stage_serves(server.url, llama_b)


def test_local_push_fills_every_stage_and_a_trainer_group_is_refused_in_words(server, llama_a, llama_b):
    from sglang_ckpt_plugin.local_push import LocalPush
    from sglang_ckpt_plugin.trainer import TrainerPush

    serve_other(server.url, llama_a)
    with LocalPush(server.url, bucket_bytes=300_000) as pusher:
        pusher.push(checkpoint_tensors(llama_b).items(), weight_version="local-b")
        assert pusher.rank_keys == RANKS
    assert_every_stage_serves(server.url, llama_b)
    with pytest.raises(ValueError, match="this server runs tp 2 x pp 2"):
        TrainerPush(server.url).connect()
