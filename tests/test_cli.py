"""Unit tests: loader CLI parsing, CPU environment, metas files; and the CLI's errors without a server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_ckpt_plugin.cpu_env import core_binds, cpu_environment
from sglang_ckpt_plugin.cpu_support import STUB_PATH
from sglang_ckpt_plugin.loader.checkpoint import CheckpointError
from sglang_ckpt_plugin.loader.cli import parse_args, parse_size
from sglang_ckpt_plugin.loader.metas import load_metas, save_metas

from .test_plan import tensor


def test_defaults_match_sglang_entry_point():
    a = parse_args(["--checkpoint-path", "/ckpt"])
    assert a.update_method == "broadcast"
    assert a.endpoint == "http://localhost:19730"
    assert a.checkpoint_name == "my-checkpoint-iter-0"
    assert a.inference_parallel_size == 1
    assert a.bucket_size == 0 and a.num_buffers == 2


def test_the_options_are_one_frozen_value_with_a_field_for_every_flag():
    import dataclasses

    from sglang_ckpt_plugin.loader.cli import build_parser
    from sglang_ckpt_plugin.loader.options import LoaderOptions

    a = parse_args(["--checkpoint-path", "/ckpt", "--weight-version", "v1"])
    assert isinstance(a, LoaderOptions)
    dests = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert {f.name for f in dataclasses.fields(LoaderOptions)} == dests | {"feeds_instance"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.checkpoint_path = "/elsewhere"  # decisions make a new value (with_), nothing changes one in place
    step = a.for_checkpoint("/w/step-2", "step-2")
    assert (step.checkpoint_path, step.weight_version, step.checkpoint_name) == ("/w/step-2", "step-2", "step-2")
    assert (a.checkpoint_path, a.weight_version, a.feeds_instance) == ("/ckpt", "v1", False)
    assert a.with_(feeds_instance=True).feeds_instance and step.endpoint == a.endpoint


def test_every_seed_option_parses():
    a = parse_args(
        [
            "--update-method",
            "all",
            "--checkpoint-path",
            "/c",
            "--inference-parallel-size",
            "1",
            "--endpoint",
            "http://h:1",
            "--checkpoint-name",
            "n",
            "--save-metas-file",
            "/m.json",
            "--uds",
            "/s.sock",
            "--weight-version",
            "v3",
            "--sleep-time",
            "1.5",
            "--bucket-size",
            "256M",
        ]
    )
    assert (a.update_method, a.uds, a.weight_version, a.sleep_time, a.bucket_size) == (
        "all",
        "/s.sock",
        "v3",
        1.5,
        256 << 20,
    )


@pytest.mark.parametrize(
    "text,value", [("auto", 0), ("1G", 1 << 30), ("512k", 512 << 10), ("100", 100), ("1.5MiB", 3 << 19)]
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--checkpoint-path", "/c", "--update-method", "gossip"],
        ["--checkpoint-path", "/c", "--bucket-size", "lots"],
        ["--checkpoint-path", "/c", "--inference-parallel-size", "0"],
        ["--checkpoint-path", "/c", "--save-metas-file", "a", "--load-metas-file", "b"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--watch", "/steps", "--draft-checkpoint-path", "/draft"],
        ["--checkpoint-path", "/c", "--draft-checkpoint-path", "/draft", "--save-metas-file", "plan.json"],
        ["--checkpoint-path", "/c", "--draft-checkpoint-path", "/draft", "--load-metas-file", "plan.json"],
    ],
)
def test_a_drafts_own_checkpoint_is_not_taken_with_watch_or_metas_files(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and "--draft-checkpoint-path" in capsys.readouterr().err


def test_a_drafts_own_checkpoint_travels_in_the_same_update_under_its_prefix(tmp_path):
    from safetensors.torch import save_file

    from sglang_ckpt_plugin.loader.checkpoint import read_update

    for name, tensors in (("target", {"w": torch.zeros(2), "v": torch.ones(3)}), ("draft", {"w": torch.ones(4)})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    update = read_update(tmp_path / "target", tmp_path / "draft")
    assert sorted((t.name, t.shape) for t in update) == [("draft.w", (4,)), ("v", (3,)), ("w", (2,))]
    assert {t.name: Path(t.file).parent.name for t in update} == {"v": "target", "w": "target", "draft.w": "draft"}
    assert [t.name for t in read_update(tmp_path / "target")] == [t.name for t in update if t.name in ("v", "w")]


def test_metas_round_trip_and_rejects_other_json(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "f.safetensors").write_bytes(b"\0" * 64)
    file = str(ckpt / "f.safetensors")
    shards = [[tensor("a", 10, file)], [tensor("b", 20, file, 10), tensor("c", 5, file, 30)]]
    save_metas(tmp_path / "m.json", "ck", shards, ckpt)
    name, loaded = load_metas(tmp_path / "m.json")
    assert name == "ck" and loaded == shards
    assert json.loads((tmp_path / "m.json").read_text())["tensors"][0]["file"] == "f.safetensors"  # relative
    (tmp_path / "x.json").write_text('{"tensors": []}')
    with pytest.raises(CheckpointError, match="not a metas file"):
        load_metas(tmp_path / "x.json")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("file", "../outside.safetensors", "outside the checkpoint directory"),
        ("file", "/etc/passwd", "outside the checkpoint directory"),
        ("file_offset", 60, "does not fit"),
        ("nbytes", 7, "does not fit"),
    ],
)
def test_metas_entries_must_stay_inside_the_checkpoint_and_its_files(tmp_path, field, value, match):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "f.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "outside.safetensors").write_bytes(b"\0" * 64)
    save_metas(tmp_path / "m.json", "ck", [[tensor("a", 10, str(ckpt / "f.safetensors"))]], ckpt)
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["tensors"][0][field] = value
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match):
        load_metas(tmp_path / "m.json")


def test_index_entries_must_stay_inside_the_checkpoint(tmp_path):
    from sglang_ckpt_plugin.loader.checkpoint import discover_files

    (tmp_path / "outside.safetensors").write_bytes(b"")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            discover_files(ckpt)


def test_api_key_never_reaches_a_child_command_line():
    from sglang_ckpt_plugin.loader.cli import without_api_key

    assert without_api_key(["--api-key", "s3cret", "--quiet", "--api-key=s3cret", "--endpoint", "x"]) == [
        "--quiet",
        "--endpoint",
        "x",
    ]


def test_cpu_environment_puts_stub_first_and_leaves_binding_to_the_plugin():
    env = cpu_environment(base={"PYTHONPATH": "/a"})
    assert env["PYTHONPATH"].split(":") == [str(STUB_PATH), "/a"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in env  # the plugin binds from the server's own --tp/--dp/--pp
    assert cpu_environment(tp_size=2, base={})["SGLANG_CPU_OMP_THREADS_BIND"].count("|") == 1


def test_core_binds_one_range_per_rank():
    assert core_binds(2, [0, 1]) == "0|1"
    assert core_binds(1, [0, 1, 2, 3]) == "0-3"
    assert core_binds(2, list(range(8))) == "0-3|4-7"
    assert core_binds(3, [0, 1]) == "0|1|0"  # more ranks than cores: round robin, one core each
    assert core_binds(2, [0, 1, 2, 5, 6, 7]) == "0-2|5-7"
    assert core_binds(2, [0, 2, 4, 6]) == "0,2|4,6"  # not contiguous: comma-separated ranges


def test_cpu_env_prints_exports():
    out = subprocess.run(
        [sys.executable, "-m", "sglang_ckpt_plugin.cpu_env"], capture_output=True, text=True, check=True
    ).stdout
    assert "export SGLANG_USE_CPU_ENGINE=1" in out and "export PYTHONPATH=" in out


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sglang_ckpt_plugin.update", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_missing_checkpoint_exits_nonzero_with_advice():
    proc = run_cli("--checkpoint-path", "/nonexistent", "--endpoint", "http://127.0.0.1:9")
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_cli_unreachable_server(tmp_path, llama_a):
    proc = run_cli("--checkpoint-path", str(llama_a), "--endpoint", "http://127.0.0.1:9", "--timeout", "2")
    assert proc.returncode == 1 and "not reachable" in proc.stderr


HANG = "from sglang_ckpt_plugin.loader import watchdog; watchdog.install({}, {}); import time; time.sleep(60)"


def test_the_watchdog_exits_1_past_its_ceiling_and_shows_where_the_process_hung():
    import time

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HANG.format(0.5, 0.5)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30
    assert "Timeout (0:00:01)!" in proc.stderr and 'File "<string>", line 1' in proc.stderr  # where it hung


def test_the_clis_timeout_bounds_a_run_against_a_server_that_never_answers(tmp_path):
    """The loader CLI against a socket that accepts and never says a word: exit 1 within --timeout (plus start-up),
    naming the server and the timeout; the watchdog is armed in that process (SIGUSR1 prints every thread's stack
    instead of killing it)."""
    import signal
    import socket
    import time

    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    mute = socket.create_server(("127.0.0.1", 0))
    port = mute.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "sglang_ckpt_plugin.update",
        "--endpoint",
        f"http://127.0.0.1:{port}",
        "--checkpoint-path",
        str(tmp_path),
        "--timeout",
        "6",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = mute.accept()  # the CLI asks; nothing answers
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        mute.close()
    took = time.monotonic() - t0
    assert proc.returncode == 1, err
    assert 6 <= took < 20, took
    assert f"server http://127.0.0.1:{port} not reachable within 6 s" in err
    assert "Current thread" in err or "Thread 0x" in err, err  # the stacks SIGUSR1 printed


def test_a_hung_child_dumps_its_stacks_before_the_test_kills_it():
    from .conftest import run_with_stacks

    with pytest.raises(AssertionError, match=r"still running after 3 s; its stacks:(.|\n)*File \"<string>\", line 1"):
        run_with_stacks([sys.executable, "-c", HANG.format(600, 0)], 3)


def test_one_process_feeds_a_cpu_server_or_a_peer_to_peer_gpu_node_and_others_get_one_loader_rank_per_tp_rank(
    monkeypatch,
):
    """The launch decision (cli.feeds_from_one_process): a CPU server of any TP size is fed by this one process, and
    so is a GPU server whose GPUs this process sees and which read each other's memory peer to peer; a GPU server
    without peer access, a p2p round, a plan saved by N ranks or --device cuda relaunch under torchrun."""
    from sglang_ckpt_plugin.loader.cli import feeds_from_one_process, parse_args
    from sglang_ckpt_plugin.transport import handles

    def info(device, peer_access=False):
        keys = ["GPU-a", "GPU-b"] if device == "cuda" else ["cpu-tp0", "cpu-tp1"]
        return {"ckpt_plugin": {"device": device, "rank_keys": keys, "tp_size": 2, "peer_access": peer_access}}

    base = ["--checkpoint-path", "x", "--inference-parallel-size", "2"]
    assert feeds_from_one_process(parse_args(base), info("cpu"))
    assert feeds_from_one_process(parse_args([*base, "--transfer", "copy"]), info("cpu"))
    monkeypatch.setattr(handles, "visible_gpu_keys", lambda: ["GPU-b", "GPU-a"])
    assert feeds_from_one_process(parse_args(base), info("cuda", peer_access=True))
    assert feeds_from_one_process(parse_args([*base, "--device", "cuda"]), info("cuda", peer_access=True))
    assert not feeds_from_one_process(parse_args([*base, "--device", "cpu"]), info("cuda", peer_access=True))
    assert not feeds_from_one_process(parse_args(base), info("cuda"))  # the torchrun ranks say why (test_world)
    monkeypatch.setattr(handles, "visible_gpu_keys", lambda: ["GPU-a"])
    assert not feeds_from_one_process(parse_args(base), info("cuda", peer_access=True))
    assert not feeds_from_one_process(parse_args(base), {"ckpt_plugin": {}})  # an older plugin: unknown device
    assert not feeds_from_one_process(parse_args(base), None)
    assert not feeds_from_one_process(parse_args([*base, "--device", "cuda"]), info("cpu"))
    assert not feeds_from_one_process(parse_args([*base, "--update-method", "p2p", "--ranks", "0"]), info("cpu"))
    metas = parse_args(["--load-metas-file", "m.json", "--inference-parallel-size", "2"])
    assert not feeds_from_one_process(metas, info("cpu"))


def test_every_node_runs_the_same_command_and_starts_its_own_torchrun():
    """--nnodes / --node-rank / --master-addr / --master-port (torchrun's own flags): each node's loader with a TP > 1
    server starts torchrun for its node of the run, a loader rank per TP rank, meeting at node 0."""
    from sglang_ckpt_plugin.loader.cli import choose_launch, node_torchrun_command, parse_args

    argv = ["--checkpoint-path", "c", "--inference-parallel-size", "2", "--api-key", "k"]
    argv += ["--nnodes", "3", "--node-rank", "1", "--master-addr", "198.18.0.1", "--master-port", "29511"]
    cmd = node_torchrun_command(parse_args(argv), argv)
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert flags == {
        "--nnodes": "3",
        "--node-rank": "1",
        "--nproc-per-node": "2",
        "--master-addr": "198.18.0.1",
        "--master-port": "29511",
    }
    assert cmd[13:16] == ["-m", "sglang_ckpt_plugin.update", "--checkpoint-path"] and "k" not in cmd
    one_node = node_torchrun_command(parse_args(argv[:6]), argv[:6])
    assert one_node[one_node.index("--master-addr") + 1] == "127.0.0.1"
    cpu = {"ckpt_plugin": {"device": "cpu", "rank_keys": ["cpu-tp0", "cpu-tp1"], "tp_size": 2}}
    assert choose_launch(parse_args(argv[:6]), cpu) == "one process"  # one node: this process feeds both ranks
    assert choose_launch(parse_args(argv), cpu) == "torchrun"  # a run over nodes, two ranks on each: torchrun


def test_a_node_with_one_loader_rank_is_that_rank_itself(monkeypatch):
    """A run over nodes with a TP = 1 server on each: no torchrun agent; the command becomes the node's loader rank,
    with the environment torchrun would give it (torch.distributed meets at --master-addr:--master-port)."""
    from sglang_ckpt_plugin.loader.cli import become_node_rank, choose_launch, parse_args
    from sglang_ckpt_plugin.loader.world import LoaderWorld

    argv = ["--checkpoint-path", "c", "--nnodes", "3", "--node-rank", "2", "--master-addr", "198.18.0.1"]
    args = parse_args([*argv, "--master-port", "29511"])
    cpu = {"ckpt_plugin": {"device": "cpu", "rank_keys": ["cpu-tp0"], "tp_size": 1}}
    assert choose_launch(args, cpu) == "node rank"
    assert choose_launch(parse_args([*argv, "--update-method", "p2p", "--ranks", "1"]), None) == "node rank"
    for name in ("RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test, whatever become_node_rank sets
        monkeypatch.delenv(name)
    become_node_rank(args)
    assert LoaderWorld.from_env(1) == LoaderWorld.of_node(1, nnodes=3, node_rank=2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("198.18.0.1", "29511")


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--nnodes", "2"], "needs --master-addr"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "a"], "--node-rank 2 is not one of --nnodes 2"),
        (["--nnodes", "0"], "is not one of --nnodes 0"),
    ],
)
def test_a_node_outside_the_run_is_refused_before_anything_starts(argv, said, capsys):
    from sglang_ckpt_plugin.loader.cli import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint-path", "c", *argv])
    assert exc.value.code == 2 and said in capsys.readouterr().err
