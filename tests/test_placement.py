"""Unit tests: a loader follows where the server's ranks run (placement.py), refusing what cannot work."""

import pytest
import torch

from sglang_ckpt_plugin.loader.http import layout_mismatch
from sglang_ckpt_plugin.placement import (
    LoaderPlacement,
    ServerPlacement,
    choose_placement,
    node_local_problem,
    shared_gpus,
    trainer_gpu,
)

CUDA_TP2 = ServerPlacement("cuda", ["GPU-a", "GPU-b"], tp_size=2)
CPU_TP2 = ServerPlacement("cpu", ["cpu-tp0", "cpu-tp1"], tp_size=2)


def test_model_info_is_read_as_published():
    info = {
        "ckpt_plugin": {"device": "cuda", "rank_keys": ["GPU-a", "GPU-b"], "tp_size": 2, "dp_size": 1, "pp_size": 1}
    }
    assert ServerPlacement.from_model_info(info) == CUDA_TP2
    assert ServerPlacement.from_model_info({"ckpt_plugin": {"tp_size": 2}}) == ServerPlacement(None, [], tp_size=2)
    peers = {"ckpt_plugin": {**info["ckpt_plugin"], "peer_access": True}}
    assert ServerPlacement.from_model_info(peers).peer_access


@pytest.mark.parametrize(
    "server, visible, problem",
    [
        (ServerPlacement("cuda", ["GPU-a", "GPU-b"], tp_size=2, peer_access=True), ["GPU-b", "GPU-a"], None),
        (CUDA_TP2, ["GPU-a", "GPU-b"], "cannot all read each other's memory peer to peer"),
        (ServerPlacement("cuda", ["GPU-a", "GPU-b"], tp_size=2, peer_access=True), ["GPU-a"], "does not see"),
        (ServerPlacement("cuda", ["GPU-a"], tp_size=2, peer_access=True), ["GPU-a", "GPU-b"], "did not publish"),
        (ServerPlacement("cuda", ["GPU-a"], tp_size=1, peer_access=True), ["GPU-a"], "several TP ranks"),
        (CPU_TP2, [], "not a GPU server"),
    ],
)
def test_one_process_feeds_a_gpu_node_only_where_it_sees_every_gpu_and_they_read_each_other(server, visible, problem):
    said = node_local_problem(server, visible)
    assert said is None if problem is None else problem in said


@pytest.mark.parametrize(
    "visible", [["GPU-b", "GPU-a"], ["GPU-x", "GPU-b"], ["GPU-b"]], ids=["reordered", "base-gpu-id", "one-visible"]
)
def test_loader_rank_uses_the_gpu_its_tp_rank_uses_whatever_the_local_index(visible):
    """CUDA_VISIBLE_DEVICES in another order, --base-gpu-id, instances not in rank order: the UUID decides."""
    got = choose_placement("auto", CUDA_TP2, tp_rank=1, local_rank=0, local_gpus=visible)
    assert got == LoaderPlacement("cuda", visible.index("GPU-b"), "GPU-b")


def test_gpu_not_visible_falls_back_to_shared_memory_or_fails_when_cuda_was_asked():
    got = choose_placement("auto", CUDA_TP2, tp_rank=0, local_rank=0, local_gpus=["GPU-b"])
    assert (got.kind, got.rank_key) == ("cpu", "GPU-a") and "not visible" in got.note
    with pytest.raises(ValueError, match="runs on GPU-a, which this loader rank does not see"):
        choose_placement("cuda", CUDA_TP2, tp_rank=0, local_rank=0, local_gpus=["GPU-b"])
    forced = choose_placement("cpu", CUDA_TP2, tp_rank=1, local_rank=1, local_gpus=["GPU-a", "GPU-b"])
    assert (forced.kind, forced.rank_key) == ("cpu", "GPU-b")  # the key is still the server's


def test_cpu_server_gets_shared_memory_even_from_a_gpu_machine():
    got = choose_placement("auto", CPU_TP2, tp_rank=1, local_rank=1, local_gpus=["GPU-a"])
    assert got == LoaderPlacement("cpu", None, "cpu-tp1")
    with pytest.raises(ValueError, match="server runs on CPU"):
        choose_placement("cuda", CPU_TP2, tp_rank=0, local_rank=0, local_gpus=["GPU-a"])


def test_server_that_did_not_say_falls_back_to_one_gpu_per_local_rank():
    unknown = ServerPlacement(None)
    assert choose_placement("auto", unknown, 0, 0, []) == LoaderPlacement("cpu", None, "cpu-tp0")
    assert choose_placement("auto", unknown, 1, 1, ["GPU-a", "GPU-b"]) == LoaderPlacement("cuda", 1, "GPU-b")
    with pytest.raises(ValueError, match="NCCL needs one GPU per loader rank"):
        choose_placement("cuda", unknown, 0, 2, ["GPU-a", "GPU-b"])
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        choose_placement("cuda", unknown, 0, 0, [])
    with pytest.raises(ValueError, match="published no GPU for TP rank 2"):
        choose_placement("auto", CUDA_TP2, 2, 0, ["GPU-a"])


def test_two_loader_ranks_on_one_gpu_are_refused_before_nccl():
    assert shared_gpus([(0, "GPU-a"), (0, "GPU-b"), (1, "GPU-a")]) is None  # same uuid text on another node
    assert "ranks 0 and 2 would both use GPU-a" in shared_gpus([(0, "GPU-a"), (0, "GPU-b"), (0, "GPU-a")])
    assert shared_gpus([(0, "cpu-tp0"), (0, "cpu-tp0")]) is None  # CPU ranks share nothing


def test_trainer_takes_a_gpu_the_server_does_not_use_or_is_refused():
    assert trainer_gpu(CUDA_TP2, ["GPU-a", "GPU-b", "GPU-c"]) == 2
    with pytest.raises(ValueError, match="every GPU this trainer sees"):
        trainer_gpu(CUDA_TP2, ["GPU-a", "GPU-b"])


def test_replicas_and_pipeline_stages_count_as_ranks():
    stages = {
        "ckpt_plugin": {"tp_size": 2, "pp_size": 2, "rank_keys": [f"cpu-pp{s}-tp{r}" for s in (0, 1) for r in (0, 1)]}
    }
    assert "runs 4 rank(s) (tp 2 x pp 2)" in layout_mismatch(stages, "x", 2)
    assert layout_mismatch(stages, "x", 4) is None
    both = ServerPlacement("cpu", [], tp_size=2, pp_size=2, dp_size=3)
    assert (both.rank_count, both.shape) == (12, "tp 2 x pp 2 x dp 3")
    pp_gpus = ServerPlacement("cuda", ["GPU-a", "GPU-b"], tp_size=1, pp_size=2, peer_access=True)
    assert "pipeline stages" in node_local_problem(pp_gpus, ["GPU-a", "GPU-b"])
    # DP attention: one TP group whose attention is split in groups; its ranks are the TP ranks
    assert layout_mismatch({"ckpt_plugin": {"tp_size": 2, "attn_dp_size": 2}}, "x", 2) is None
    keys = ["cpu-dp0-tp0", "cpu-dp0-tp1", "cpu-dp1-tp0", "cpu-dp1-tp1"]
    replicas = {"ckpt_plugin": {"tp_size": 2, "dp_size": 2, "device": "cpu", "rank_keys": keys}}
    assert "runs 4 rank(s) (tp 2 x dp 2)" in layout_mismatch(replicas, "http://x", 2)
    assert "pass --inference-parallel-size 4" in layout_mismatch(replicas, "http://x", 2)
    assert layout_mismatch(replicas, "http://x", 4) is None
    older = {"ckpt_plugin": {"tp_size": 1, "dp_size": 2, "rank_keys": ["cpu-tp0"]}}  # a plugin before replicas
    assert "predates data-parallel and pipeline updates" in layout_mismatch(older, "http://x", 2)
    assert "pass --inference-parallel-size 2" in layout_mismatch({"ckpt_plugin": {"tp_size": 2}}, "http://x", 1)
    server = ServerPlacement.from_model_info(replicas)
    # every rank of every replica gets a placement of its own key (one loader process feeds them all on CPU)
    assert [choose_placement("auto", server, r, 0, []).rank_key for r in range(server.rank_count)] == keys


def _serving(pusher, monkeypatch, plugin: dict) -> None:
    monkeypatch.setattr(pusher.client, "wait_until_listening", lambda: {"ckpt_plugin": plugin})


def test_local_push_follows_the_server(monkeypatch):
    """A GPU server with tp=2: CUDA buffers on TP rank 0's GPU where the ranks read each other's memory peer to peer
    and this process sees both GPUs; else one shared-memory buffer set every rank maps, keyed by the ranks' GPU
    UUIDs, and CUDA buffers refused, saying why."""
    from sglang_ckpt_plugin import local_push
    from sglang_ckpt_plugin.local_push import LocalPush

    monkeypatch.setattr(local_push, "visible_gpu_keys", lambda: ["GPU-b", "GPU-a"])
    gpu_tp2 = {"device": "cuda", "rank_keys": ["GPU-a", "GPU-b"], "tp_size": 2}
    pusher = LocalPush("http://127.0.0.1:9")
    _serving(pusher, monkeypatch, gpu_tp2)
    pusher._place()
    assert (pusher.device.type, pusher.rank_keys) == ("cpu", ["GPU-a", "GPU-b"])
    asked_cuda = LocalPush("http://127.0.0.1:9", device="cuda")
    _serving(asked_cuda, monkeypatch, gpu_tp2)
    with pytest.raises(ValueError, match="cannot all read each other's memory peer to peer .*: use device='auto'"):
        asked_cuda._place()
    peer_to_peer = LocalPush("http://127.0.0.1:9")
    _serving(peer_to_peer, monkeypatch, {**gpu_tp2, "peer_access": True})
    peer_to_peer._place()
    assert (peer_to_peer.device, peer_to_peer.rank_keys) == (torch.device("cuda", 1), ["GPU-a", "GPU-b"])
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        LocalPush("http://127.0.0.1:9", device="mps")
    # two replicas of one GPU each: never one CUDA buffer set for both (a replica's GPU would be sent the other's)
    gpu_dp2 = {"device": "cuda", "rank_keys": ["GPU-a", "GPU-b"], "tp_size": 1, "dp_size": 2}
    replicas = LocalPush("http://127.0.0.1:9")
    _serving(replicas, monkeypatch, gpu_dp2)
    replicas._place()
    assert (replicas.device.type, replicas.rank_keys) == ("cpu", ["GPU-a", "GPU-b"])
    replicas_cuda = LocalPush("http://127.0.0.1:9", device="cuda")
    _serving(replicas_cuda, monkeypatch, gpu_dp2)
    with pytest.raises(ValueError, match="tp 1 x dp 2 server .*data-parallel replicas"):
        replicas_cuda._place()


def test_local_push_buffers_are_made_as_the_push_needs_them(monkeypatch):
    """Kept while they fit; made again when a push needs more of them, at the size it needs (one whole-update
    buffer never turns into two of that size)."""
    from sglang_ckpt_plugin.local_push import LocalPush

    with LocalPush("http://127.0.0.1:9") as pusher:
        _serving(pusher, monkeypatch, {"device": "cpu", "rank_keys": ["cpu-tp0"], "tp_size": 1})
        pusher._place()
        pusher._ensure_buffers(1 << 20, 1)
        whole = pusher.buffers[0]
        pusher._ensure_buffers(4096, 1)
        assert pusher.buffers == [whole]
        pusher._ensure_buffers(4096, 2)
        assert [b.nbytes for b in pusher.buffers] == [4096, 4096]
    assert pusher.buffers == []


def test_trainer_push_follows_the_server(monkeypatch):
    from sglang_ckpt_plugin.trainer import TrainerPush

    trainer = TrainerPush("http://127.0.0.1:9", device="cuda")
    with pytest.raises(ValueError, match="server runs on CPU"):
        trainer._choose_device(CPU_TP2)
    assert TrainerPush("http://127.0.0.1:9")._choose_device(CPU_TP2).type == "cpu"
    with pytest.raises(ValueError, match="weight-update group is NCCL"):
        TrainerPush("http://127.0.0.1:9", device="cpu")._choose_device(CUDA_TP2)
