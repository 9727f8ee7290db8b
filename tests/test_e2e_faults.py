"""Faults against a real SGLang server: what the user sees and what state the server is left in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, generate_ids

from .conftest import NEW_TOKENS, PROMPT, assert_serves, communicate_or_dump, our_leftovers, push, sample, scrape

pytestmark = pytest.mark.slow
FAULTY = Path(__file__).with_name("faulty_loader.py")
IDLE_TIMEOUT_S = 20  # the server's SGLANG_CKPT_IDLE_TIMEOUT in this module


def faulty(mode: str, url: str, ckpt: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(FAULTY),
        mode,
        "--",
        "--checkpoint-path",
        str(ckpt),
        "--endpoint",
        url,
        "--quiet",
        "--bucket-size",
        "300K",
        *extra,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    return communicate_or_dump(proc, timeout_s, "faulty loader")


def info(url: str) -> dict:
    return httpx.get(f"{url}/model_info", timeout=30).json()


def wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def server(llama_a, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "faults_server.log"
    with SGLangServer(
        llama_a, log, env={"SGLANG_CKPT_IDLE_TIMEOUT": str(IDLE_TIMEOUT_S)}, extra_args=["--enable-metrics"]
    ) as srv:
        srv.wait_listening()
        push(srv.url, llama_a, "--weight-version", "a-1")
        srv.wait_healthy(timeout_s=60)
        yield srv
    assert srv.group_pids() == []


def assert_serving(url: str, ckpt: Path, version: str) -> None:
    """Complete, on ``version``, and exactly ``ckpt`` by SGLang's own evidence (checksums, greedy output)."""
    assert info(url)["ckpt_plugin"]["weights_state"] == "complete"
    assert generate_ids(url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == version
    assert_serves(url, ckpt)


def test_bad_checkpoint_changes_nothing(server, llama_a, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    before = set(our_leftovers())
    proc = push(server.url, tmp_path, "--weight-version", "bad", check=False)
    assert proc.returncode == 1 and "corrupt header" in proc.stderr
    assert set(our_leftovers()) - before == set()
    assert_serving(server.url, llama_a, "a-1")


def test_second_update_while_one_runs_gets_409_and_nothing_changes(server, llama_a, llama_b):
    before = set(our_leftovers())
    stalled = faulty("stall-before-buckets", server.url, llama_b, "--weight-version", "stalled")
    try:
        wait_for(lambda: info(server.url)["ckpt_plugin"]["update_in_progress"], timeout_s=120)
        # a second update call at once (an HTTP call, not a second loader process: starting one can take longer
        # than the server's idle timeout on a loaded machine, and the first update would be over by then)
        body = {"zmq_handles": {"cpu-tp0": "ipc:///nowhere.sock"}, "weight_version": "second"}
        second = httpx.post(f"{server.url}/update_weights_from_ipc", json=body, timeout=30)
        assert second.status_code == 409 and "in progress" in second.json()["message"]
    finally:
        stalled.send_signal(signal.SIGKILL)  # also when the test failed: its update must not hold the next test
        stalled.wait(timeout=30)
    # the server notices the vanished loader at once; nothing had been written, so it keeps serving a-1
    wait_for(lambda: not info(server.url)["ckpt_plugin"]["update_in_progress"], timeout_s=20)
    last = info(server.url)["ckpt_plugin"]["last_update"]
    assert last["outcome"] == "failed" and "disconnected" in last["message"]
    assert set(our_leftovers()) - before == set()
    assert_serving(server.url, llama_a, "a-1")


def test_loader_killed_mid_update_closes_the_server_until_a_complete_push(server, llama_a, llama_b):
    before = set(our_leftovers())
    proc = faulty("kill-after-2", server.url, llama_b, "--weight-version", "b-partial")
    finish(proc, 120)
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.monotonic()
    noticed_at = wait_for(lambda: info(server.url)["ckpt_plugin"]["weights_state"] == "incomplete", timeout_s=20)
    assert noticed_at - killed_at < 10, "the server must notice a dead loader quickly, not at its idle timeout"
    doc = info(server.url)
    assert doc["weights_loaded"] is False and doc["weight_version"] == "a-1"
    assert doc["ckpt_plugin"]["last_update"]["outcome"] == "incomplete"
    assert doc["ckpt_plugin"]["missing_count"] == 15  # the whole update must be written again
    resp = httpx.post(f"{server.url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert resp.status_code == 503 and "incomplete" in resp.json()["message"]
    assert httpx.get(f"{server.url}/health").status_code == 503
    assert set(our_leftovers()) - before == set(), "shared memory or socket files left behind by the killed loader"
    # a fresh, complete push recovers the server
    push(server.url, llama_b, "--weight-version", "b-1")
    assert_serving(server.url, llama_b, "b-1")


def _send_raw_generate(url: str) -> socket.socket:
    """Send a complete /generate request and return the connection (the answer is read later): when this
    returns, the request bytes have left this process."""
    import json
    from urllib.parse import urlparse

    body = json.dumps({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0}})
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=120)
    sock.sendall(
        (
            f"POST /generate HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        ).encode()
    )
    return sock


def _read_raw_response(sock) -> tuple[int, str]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def test_request_queued_during_a_failing_update_is_refused_by_the_scheduler_guard(server, llama_a, llama_b):
    """A request admitted while the weights were complete waits on SGLang's model-update lock; the update then
    fails part-way. The scheduler-side guard (not the HTTP gate) must refuse it: status 500 with the guard's
    own words, never a 200 computed on half-new weights."""
    from sglang_ckpt_plugin.server.tp_worker import INCOMPLETE_REFUSAL

    push(server.url, llama_a, "--weight-version", "a-2")
    stalled = faulty("stall-after-first-bucket", server.url, llama_b, "--weight-version", "b-partial")
    try:
        assert stalled.stdout.readline().startswith("stalled after bucket 0"), "the first bucket was not loaded"
        sock = _send_raw_generate(server.url)  # past the HTTP gate (still open), queued behind the update
        time.sleep(0.5)  # let the server read it off the socket: the kill below must not overtake it
    finally:
        stalled.send_signal(signal.SIGKILL)
        stalled.wait(timeout=30)
    status, body = _read_raw_response(sock)
    assert status == 500 and INCOMPLETE_REFUSAL[:60] in body, (status, body[:300])
    assert info(server.url)["ckpt_plugin"]["weights_state"] == "incomplete"
    push(server.url, llama_a, "--weight-version", "a-3")
    assert_serving(server.url, llama_a, "a-3")


def test_clients_never_see_mixed_weights_while_updates_alternate(server, llama_a, llama_b):
    """Generate continuously while updates alternate between two checkpoints: each response's tokens must equal
    SGLang's own output for the checkpoint its meta_info.weight_version names (references taken first, on this
    server, from SGLang's disk reload of each checkpoint)."""
    import threading

    expected = {}
    for name, ckpt in (("A", llama_a), ("B", llama_b)):
        push(server.url, ckpt, "--weight-version", f"{name}-ref")
        expected[name] = assert_serves(server.url, ckpt).disk_ids
    assert expected["A"] != expected["B"]
    stop = threading.Event()
    seen: list[tuple[str, list[int]]] = []
    errors: list[str] = []

    def client():
        while not stop.is_set():
            try:
                r = generate_ids(server.url, PROMPT, NEW_TOKENS)
                seen.append((r["meta_info"]["weight_version"], r["output_ids"]))
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(4):
            name, ckpt = ("A", llama_a) if i % 2 == 0 else ("B", llama_b)
            push(server.url, ckpt, "--weight-version", f"{name}-{i}", "--bucket-size", "300K")
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    versions = {v for v, _ in seen}
    assert {"A-0", "B-1", "A-2", "B-3"} & versions, f"no response on pushed weights: {versions}"
    assert len(seen) >= 8
    for version, ids in seen:  # every version pushed in this module starts with a / A or b / B
        assert ids == expected[version[0].upper()], f"response tagged {version} does not match that checkpoint"


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` (config, tokenizer) whose tensors are ``edit(dict)``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    save_file(edit(tensors), dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "case,edit,message",
    [
        ("missing", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}, "does not cover 1 parameter"),
        (
            "unknown",
            lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": t["model.norm.weight"].clone()},
            "model.layers.0.mlp.extra_proj.weight",
        ),
        ("shape", lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:32].clone()}, "shape mismatch"),
        ("marker", lambda t: {**t, "[weights incomplete]": t["model.norm.weight"].clone()}, "[weights incomplete]"),
    ],
    ids=["missing", "unknown", "shape", "marker-name"],
)
def test_update_that_does_not_fit_the_model_is_rejected_before_writing(
    server, llama_a, llama_b, tmp_path, case, edit, message
):
    push(server.url, llama_a, "--weight-version", "a-before")
    bad = _variant(llama_b, tmp_path / case, edit)  # of the checkpoint not served: a partial write would show
    before = set(our_leftovers())
    proc = push(server.url, bad, "--weight-version", f"bad-{case}", check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "rejected" in proc.stderr
    assert set(our_leftovers()) - before == set()
    assert_serving(server.url, llama_a, "a-before")  # same outputs, same version, still complete


def test_explicit_partial_update_changes_exactly_what_it_names(server, llama_a, llama_b, tmp_path):
    from sglang_ckpt_plugin.demo.evidence import parameter_checksums

    only_norm = _variant(llama_b, tmp_path / "norm_only", lambda t: {"model.norm.weight": t["model.norm.weight"]})
    push(server.url, llama_b, "--weight-version", "b-all")
    b = parameter_checksums(server.url)
    push(server.url, llama_a, "--weight-version", "a-all")
    a = parameter_checksums(server.url)
    assert push(server.url, only_norm, "--weight-version", "partial", check=False).returncode == 1  # needs --partial
    assert parameter_checksums(server.url) == a
    push(server.url, only_norm, "--weight-version", "a-with-b-norm", "--partial")
    assert parameter_checksums(server.url) == {**a, "model.norm.weight": b["model.norm.weight"]}
    assert info(server.url)["ckpt_plugin"]["weights_state"] == "complete"  # every parameter holds real weights
    push(server.url, llama_a, "--weight-version", "a-after")
    assert_serving(server.url, llama_a, "a-after")


def test_silent_loader_fails_the_update_after_the_idle_timeout(server, llama_a, llama_b):
    push(server.url, llama_a, "--weight-version", "a-q")
    silent = faulty("stall-after-first-bucket", server.url, llama_b, "--weight-version", "b-silent")
    try:
        wait_for(lambda: info(server.url)["ckpt_plugin"]["update_in_progress"], timeout_s=120)
        started = time.monotonic()
        ended = wait_for(lambda: not info(server.url)["ckpt_plugin"]["update_in_progress"], IDLE_TIMEOUT_S + 30)
        assert IDLE_TIMEOUT_S - 2 <= ended - started <= IDLE_TIMEOUT_S + 15
        doc = info(server.url)
        assert "went quiet" in doc["ckpt_plugin"]["last_update"]["message"]
        assert doc["ckpt_plugin"]["last_update"]["outcome"] == "incomplete"
        assert doc["ckpt_plugin"]["weights_state"] == "incomplete"  # its first bucket had been loaded
    finally:
        silent.kill()
        silent.wait(timeout=30)
    push(server.url, llama_a, "--weight-version", "a-q2")
    assert_serving(server.url, llama_a, "a-q2")


@pytest.mark.parametrize("transfer", ["copy", "map"])
def test_corrupted_bucket_is_refused_before_it_is_loaded(server, llama_a, llama_b, transfer):
    push(server.url, llama_a, "--weight-version", "a-c")
    before = set(our_leftovers())
    proc = faulty(
        "corrupt-digests", server.url, llama_b, "--weight-version", "b-corrupt", "--verify", "--transfer", transfer
    )
    _, err = finish(proc, 120)
    assert proc.returncode == 1 and "checksum mismatch" in err
    assert set(our_leftovers()) - before == set()
    assert_serving(server.url, llama_a, "a-c")  # the first bucket was refused: nothing was written
    # the refused bucket's mapping was let go (a traceback that kept its views parked it for good)
    assert "could not be unmapped" not in server.log_path.read_text(errors="replace")


def test_wrong_inference_parallel_size_is_refused_and_changes_nothing(server, llama_a, llama_b):
    push(server.url, llama_a, "--weight-version", "a-ips")
    proc = push(server.url, llama_b, "--inference-parallel-size", "2", check=False)
    assert proc.returncode == 1 and "pass --inference-parallel-size 1" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # refused before any loader rank was started
    assert_serving(server.url, llama_a, "a-ips")


def test_metrics_count_every_outcome_as_the_gate_sees_it(server, llama_a, llama_b, tmp_path):
    """SGLang's own /metrics (--enable-metrics, its multiprocess Prometheus setup): a push, a rejected push and a
    killed push each counted once under their outcome; state, loaded flag, version and bytes follow."""
    push(server.url, llama_a, "--weight-version", "m-1")
    before = scrape(server.url)
    assert sample(before, "sglang:ckpt_weights_loaded") == 1
    assert sample(before, "sglang:ckpt_weights_state", state="complete") == 1
    assert sample(before, "sglang:ckpt_weights_state", state="waiting") == 0
    assert sample(before, "sglang:ckpt_weight_version_info", version="m-1") == 1

    def delta(after, outcome):
        return sample(after, "sglang:ckpt_updates_total", outcome=outcome, source="ipc") - sample(
            before, "sglang:ckpt_updates_total", outcome=outcome, source="ipc"
        )

    push(server.url, llama_b, "--weight-version", "m-2")
    after = scrape(server.url)
    assert delta(after, "success") == 1 and delta(after, "rejected") == 0
    nbytes = sum(f.stat().st_size for f in llama_b.glob("*.safetensors"))  # header bytes are not weights
    grown = sample(after, "sglang:ckpt_update_bytes_total") - sample(before, "sglang:ckpt_update_bytes_total")
    assert 0.9 * nbytes < grown <= nbytes
    assert sample(after, "sglang:ckpt_update_seconds_count") == sample(before, "sglang:ckpt_update_seconds_count") + 1
    assert sample(after, "sglang:ckpt_weight_version_info", version="m-2") == 1
    assert sample(after, "sglang:ckpt_weight_version_info", version="m-1") == 0
    assert sample(after, "sglang:ckpt_last_update_timestamp_seconds") >= time.time() - 120

    bad = _variant(
        llama_b, tmp_path / "shape", lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:32].clone()}
    )
    assert push(server.url, bad, "--weight-version", "m-bad", check=False).returncode == 1
    after = scrape(server.url)
    assert delta(after, "rejected") == 1 and sample(after, "sglang:ckpt_weights_loaded") == 1

    proc = faulty("kill-after-2", server.url, llama_a, "--weight-version", "m-killed")
    finish(proc, 120)
    wait_for(lambda: info(server.url)["ckpt_plugin"]["weights_state"] == "incomplete", timeout_s=20)
    after = scrape(server.url)
    assert delta(after, "incomplete") == 1 and delta(after, "success") == 1
    assert sample(after, "sglang:ckpt_weights_loaded") == 0
    assert sample(after, "sglang:ckpt_weights_state", state="incomplete") == 1
    assert sample(after, "sglang:ckpt_weights_state", state="complete") == 0

    push(server.url, llama_a, "--weight-version", "m-3")  # leave the server serving a complete set
    assert sample(scrape(server.url), "sglang:ckpt_weights_loaded") == 1


class _TouchesAFileWhenUnpickled:
    """What a hostile pickle can do: if anything on the server unpickled this, the marker file would appear."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_engine_parameter_server_is_told_what_to_run_instead(server, llama_a, tmp_path):
    """SGLang's documented `python -m sglang.srt.checkpoint_engine.update` (checkpoint-engine's ParameterServer):
    a REQ socket bound on an abstract endpoint, a pickled handle as its first frame. The server answers in
    checkpoint-engine's own error form (a text reply) and over HTTP, unpickles nothing, changes nothing."""
    import pickle
    import threading

    import zmq

    push(server.url, llama_a, "--weight-version", "ce-before")
    marker = tmp_path / "unpickled"
    endpoint = f"ipc://@checkpoint-engine-cpu-tp0-{os.getpid()}-{time.monotonic_ns()}.sock"
    ctx = zmq.Context()
    ps = ctx.socket(zmq.REQ)
    ps.setsockopt(zmq.LINGER, 0)
    ps.bind(endpoint)
    answer = {}
    body = {"zmq_handles": {"cpu-tp0": endpoint}, "flush_cache": True, "weight_version": "ce-1"}
    call = threading.Thread(
        target=lambda: answer.update(resp=httpx.post(f"{server.url}/update_weights_from_ipc", json=body, timeout=120))
    )
    call.start()
    try:
        ps.send(pickle.dumps(("rebuild_cuda_tensor", (_TouchesAFileWhenUnpickled(marker),)), protocol=4))
        assert ps.poll(60_000, zmq.POLLIN), "no reply to the ParameterServer's first frame"
        reply = ps.recv().decode()
        ps.send(pickle.dumps(RuntimeError("Some workers failed to update weights")))  # as its PS does next
    finally:
        call.join(timeout=120)
        ps.close()
        ctx.term()
    assert "sglang-ckpt-plugin" in reply and "python -m sglang_ckpt_plugin.update" in reply
    resp = answer["resp"]
    assert resp.status_code == 400 and "python -m sglang_ckpt_plugin.update" in resp.json()["message"]
    assert not marker.exists()
    assert info(server.url)["ckpt_plugin"]["last_update"]["outcome"] == "rejected"
    assert_serving(server.url, llama_a, "ce-before")
