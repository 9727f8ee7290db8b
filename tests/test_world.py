"""The loader's control collectives over real gloo, two processes on 127.0.0.1 (no server involved)."""

import os
import subprocess
import sys
import textwrap

import pytest

from sglang_ckpt_plugin.loader.http import free_port
from sglang_ckpt_plugin.loader.world import LoaderWorld

SCRIPT = textwrap.dedent("""
    import torch
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    world = LoaderWorld.from_env(1)
    c = Control(world, torch.device("cpu"), 30)
    print("id", c.broadcast_str("update-%d" % world.rank))
    print("names", ",".join(c.all_gather_str("cpu-tp%d" % world.rank)))
    print("ints", c.all_gather_int(100 + world.rank))
    print("failed", c.any_failed(world.rank == 1), c.any_failed(False))
    c.close()
""")


def test_control_collectives_between_two_processes():
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        assert "id update-0" in out
        assert "names cpu-tp0,cpu-tp1" in out
        assert "ints [100, 101]" in out
        assert "failed True False" in out


def test_world_maps_ranks_to_instances(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    w = LoaderWorld.from_env(2)
    assert (w.instance, w.tp_rank, w.is_leader, w.instance_ranks(), w.num_instances) == (1, 1, False, [2, 3], 2)
    with pytest.raises(ValueError, match="multiple"):
        LoaderWorld.from_env(3)
