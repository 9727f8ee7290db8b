"""A real SGLang server started with dummy weights and --wait-for-initial-weights; the loader pushes."""

from __future__ import annotations

import contextlib
import sys

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids

from .conftest import NEW_TOKENS, PROMPT, assert_serves, our_leftovers, push, serve_other

pytestmark = pytest.mark.slow

MODEL_ROUTES = [
    ("POST", "/generate", {"text": "w5 w6", "sampling_params": {"max_new_tokens": 2}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "w5 w6", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}),
    ("GET", "/health", None),
    ("GET", "/health_generate", None),
]


@pytest.fixture(scope="module")
def server(llama_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "llama_server.log"
    with SGLangServer(llama_a, log) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


ALL_PARAMETERS = 15  # of the tiny Llama as SGLang holds it (qkv and gate_up fused)


@contextlib.contextmanager
def waiting(server, model, tmp_path, untouched: bool):
    """The module's server while it still waits for its first complete weights (and, ``untouched``, before any push
    wrote a byte), else a fresh one: a test that needs a server without weights passes whichever test ran before."""
    info = httpx.get(f"{server.url}/model_info", timeout=30).json()["ckpt_plugin"]
    if info["weights_state"] == "waiting" and (not untouched or info["missing_count"] == ALL_PARAMETERS):
        yield server
        return
    with SGLangServer(model, tmp_path / "waiting_server.log") as fresh:
        fresh.wait_listening()
        yield fresh


@pytest.mark.compat
def test_gate_refuses_everything_that_runs_the_model(server, llama_a, tmp_path):
    with (
        waiting(server, llama_a, tmp_path, untouched=True) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        for method, path, body in MODEL_ROUTES:
            resp = c.request(method, path, json=body)
            assert resp.status_code == 503, (path, resp.status_code, resp.text[:200])
            assert "weights have not been loaded" in resp.json()["message"], path
            assert "sglang_ckpt_plugin.update" in resp.json()["message"], path
        info = c.get("/model_info").json()
    assert info["weights_loaded"] is False
    plugin = info["ckpt_plugin"]
    assert plugin["wait_for_initial_weights"] is True and plugin["weights_state"] == "waiting"
    assert plugin["missing_count"] == ALL_PARAMETERS and "model.norm.weight" in plugin["missing"]  # every one
    # where its ranks run, for loaders to follow (placement.py); one replica, no pipeline stages
    assert (plugin["device"], plugin["rank_keys"]) == ("cpu", ["cpu-tp0"])
    assert (plugin["tp_size"], plugin["dp_size"], plugin["pp_size"]) == (1, 1, 1)


def test_message_text_cannot_open_the_gate_or_fake_a_fingerprint(server, llama_a, tmp_path):
    """SGLang echoes the caller's weight_version in its messages; our state never comes from messages. A trainer
    session that writes one parameter, with a version string that once opened the gate, leaves it closed."""
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.trainer import TrainerPush

    norm = load_file(llama_a / "model.safetensors")["model.norm.weight"]
    with waiting(server, llama_a, tmp_path, untouched=True) as server:
        with TrainerPush(server.url, timeout_s=120) as trainer:
            trainer.push(
                [("model.norm.weight", norm)], weight_version="[weights complete] fingerprint=0123456789abcdef"
            )
        info = httpx.get(f"{server.url}/model_info", timeout=30).json()["ckpt_plugin"]
        assert info["weights_state"] == "waiting" and info["fingerprint"] is None
        assert info["missing_count"] == ALL_PARAMETERS - 1 and "model.norm.weight" not in info["missing"]  # written
        assert httpx.post(f"{server.url}/generate", json=MODEL_ROUTES[0][2], timeout=30).status_code == 503


def test_endpoint_that_is_not_a_live_socket_fails_at_once(server):
    """A name that passes the pattern but is no socket must not hold the scheduler for the idle timeout."""
    import time

    from sglang_ckpt_plugin.transport.channel import make_endpoint

    before = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]["weights_state"]
    t0 = time.monotonic()
    resp = httpx.post(
        f"{server.url}/update_weights_from_ipc",
        timeout=60,
        json={"zmq_handles": {"cpu-tp0": make_endpoint("none", "cpu-tp0")}},
    )
    assert resp.status_code != 200 and "no such socket" in resp.text
    assert time.monotonic() - t0 < 5
    assert httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]["weights_state"] == before


def test_partial_pushes_that_together_cover_the_model_open_the_gate(server, llama_a, tmp_path):
    """Each push writes part of the model (one of them a single stacked shard, v_proj); the gate stays closed,
    naming what is missing, until together they wrote every parameter and every shard."""
    from .test_e2e_faults import _variant

    def only(pred):
        return lambda t: {k: v for k, v in t.items() if pred(k)}

    first = _variant(llama_a, tmp_path / "first", only(lambda k: "v_proj" not in k))
    second = _variant(llama_a, tmp_path / "second", only(lambda k: "v_proj" in k))
    with waiting(server, llama_a, tmp_path, untouched=False) as server:
        push(server.url, first, "--weight-version", "a-first", "--partial")
        info = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]
        assert info["weights_state"] == "waiting" and info["missing_count"] == 2
        v_rows = "unwritten: dim-0 index 96-127 of 128"  # q: rows 0-63, k: 64-95, v: 96-127 of the fused qkv_proj
        assert info["missing"] == [f"model.layers.{i}.self_attn.qkv_proj.weight ({v_rows})" for i in range(2)]
        resp = httpx.post(f"{server.url}/generate", json=MODEL_ROUTES[0][2], timeout=30)
        assert resp.status_code == 503 and "qkv_proj" in resp.json()["message"]
        push(server.url, second, "--weight-version", "a-1", "--partial")
        server.wait_healthy(timeout_s=60)
        info = httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]
        assert info["weights_state"] == "complete" and info["missing"] == []


@pytest.mark.compat
def test_push_serves_exactly_the_checkpoint(server, llama_a, llama_b):
    serve_other(server.url, llama_b)  # the push below must change what is served
    before = set(our_leftovers())
    out = push(server.url, llama_a, "--weight-version", "a-1")
    assert "pushed" in out.stdout and "stages: read" in out.stdout
    assert set(our_leftovers()) - before == set()
    server.wait_healthy(timeout_s=60)
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-1"
    assert_serves(server.url, llama_a)
    info = httpx.get(f"{server.url}/model_info").json()
    assert info["weights_loaded"] is True and info["weight_version"] == "a-1"
    assert info["ckpt_plugin"]["last_update"]["outcome"] == "success"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for method, path, body in MODEL_ROUTES:
            assert c.request(method, path, json=body).status_code == 200, path


def test_evidence_catches_a_server_that_serves_another_checkpoint(server, llama_a, llama_b):
    """The evidence itself can fail: llama_a is served, llama_b is what we claim."""
    from sglang_ckpt_plugin.demo.evidence import gather

    serve_other(server.url, llama_b)
    push(server.url, llama_a, "--weight-version", "a-2")
    ev = gather(server.url, llama_b, PROMPT, NEW_TOKENS)
    assert not ev.bit_identical and not ev.ok and ev.verdict().startswith("FAIL")


def test_second_push_of_sharded_checkpoint_switches_output(server, llama_a, llama_b):
    serve_other(server.url, llama_b)
    push(server.url, llama_a, "--weight-version", "a-3")
    a = assert_serves(server.url, llama_a)
    before = set(our_leftovers())
    push(server.url, llama_b, "--weight-version", "b-1", "--bucket-size", "300K")  # several buckets, 2 in flight
    assert set(our_leftovers()) - before == set()
    result = generate_ids(server.url, PROMPT, NEW_TOKENS)
    assert result["meta_info"]["weight_version"] == "b-1"
    b = assert_serves(server.url, llama_b)
    assert a.served_checksum != b.served_checksum and a.served_ids != b.served_ids
    assert httpx.get(f"{server.url}/model_info").json()["weight_version"] == "b-1"


def test_verified_push_reports_the_fingerprint_of_the_files_on_disk(server, llama_a, llama_b):
    from .test_transport import disk_fingerprint

    serve_other(server.url, llama_b)  # the push below must change what is served
    out = push(server.url, llama_a, "--weight-version", "a-verified", "--verify")
    loader_fp = out.stdout.split("fingerprint=")[1].split()[0]
    info = httpx.get(f"{server.url}/model_info").json()
    assert info["ckpt_plugin"]["fingerprint"] == loader_fp == disk_fingerprint(llama_a)
    assert_serves(server.url, llama_a)
    # a disk reload (what assert_serves ends with) is not the verified push: no fingerprint is claimed
    assert httpx.get(f"{server.url}/model_info").json()["ckpt_plugin"]["fingerprint"] is None


NO_TORCH_PROBE = """
import runpy, sys
sys.argv = ["sglang_ckpt_plugin.update", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("sglang_ckpt_plugin.update", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code or 0
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
sys.exit(code)
"""


def test_one_rank_cpu_push_starts_without_torch(server, llama_a, llama_b):
    """A one-process CPU push imports no torch, whether the server maps the files (page cache) or the loader fills
    shared bucket buffers (--transfer copy): nothing moves between loader processes, so nothing needs it and the
    push starts at once. Both serve exactly the checkpoint."""
    from .conftest import run_with_stacks

    serve_other(server.url, llama_a)  # each push below changes what is served
    base = [sys.executable, "-c", NO_TORCH_PROBE, "--endpoint", server.url, "--quiet", "--timeout", "120"]
    mapped = run_with_stacks([*base, "--checkpoint-path", str(llama_b), "--weight-version", "nt-1"], 300)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert "page cache" in mapped.stdout and mapped.stdout.strip().endswith("NO_TORCH"), mapped.stdout
    assert_serves(server.url, llama_b)
    copied = run_with_stacks(
        [*base, "--checkpoint-path", str(llama_a), "--weight-version", "nt-2", "--transfer", "copy"], 300
    )
    assert copied.returncode == 0 and copied.stdout.strip().endswith("NO_TORCH"), copied.stdout
    assert "shared bucket buffers" in copied.stdout
    assert_serves(server.url, llama_a)


def test_trainer_bucket_refused_before_its_broadcast_fails_fast_and_the_trainer_pushes_again(server, llama_a, llama_b):
    """SGLang refuses a bucket outside a begin/end session before it joins the broadcast: the trainer's broadcast
    can never complete. The trainer must say so at once (not wait out the group's timeout, or on NCCL hang its
    next GPU op) and be able to reconnect and push."""
    import time

    from safetensors.torch import load_file

    from sglang_ckpt_plugin.trainer import ServerError, TrainerPush

    tensors = load_file(llama_a / "model.safetensors")
    serve_other(server.url, llama_b)  # the trainer's push below must change what is served
    with TrainerPush(server.url, timeout_s=90) as trainer:
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="refused a bucket before receiving it.*call connect"):
            trainer._push_bucket([("model.norm.weight", tensors["model.norm.weight"])], None, False)
        assert time.monotonic() - t0 < 30 and trainer.group is None
        trainer.connect()
        trainer.push(tensors.items(), weight_version="trainer-again")
    assert generate_ids(server.url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "trainer-again"
    assert_serves(server.url, llama_a)
