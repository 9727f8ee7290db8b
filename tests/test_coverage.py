"""Unit tests: coverage measured byte by byte from where a loader's writes land (fused MoE experts, strided
views, padding), and one writer of the model at a time (a dry run never swallows a real load)."""

import threading

import numpy as np
import pytest
import torch

from sglang_ckpt_plugin.server.coverage import Extent, describe_unwritten, missing_from, union, view_runs
from sglang_ckpt_plugin.server.validate import UpdateRejected, observe, required_coverage, validate_update

E, I, H = 4, 3, 2  # experts, intermediate, hidden  # noqa: E741 - the names of the dimensions


class FusedMoE(torch.nn.Module):
    """Loads like SGLang's FusedMoE: every expert's w1/w3 in one ``w13_weight`` [E, 2I, H] and w2 in ``w2_weight``
    [E, H, I], through ``weight_loader(param, w, name, shard_id, expert_id)``; experts not on this rank are skipped
    (expert parallelism)."""

    def __init__(self, local_experts=range(E)):
        super().__init__()
        self.local = list(local_experts)
        self.w13_weight = torch.nn.Parameter(torch.zeros(len(self.local), 2 * I, H), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.zeros(len(self.local), H, I), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, weight_name, shard_id, expert_id):
        if expert_id not in self.local:
            return
        expert = param.data[self.local.index(expert_id)]
        if shard_id == "w2":
            expert.copy_(loaded)
        else:
            expert.narrow(0, 0 if shard_id == "w1" else I, I).copy_(loaded)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, w in weights:
            _, e, proj = name.split(".")  # experts.<e>.<w1|w2|w3>
            pname = "w2_weight" if proj == "w2" else "w13_weight"
            params[pname].weight_loader(params[pname], w, name, proj, int(e))


def moe_manifest(experts=range(E), projs=("w1", "w2", "w3")):
    shapes = {"w1": [I, H], "w3": [I, H], "w2": [H, I]}
    return [(f"experts.{e}.{p}", "float32", shapes[p]) for e in experts for p in projs]


def test_a_push_lacking_experts_is_refused_as_complete_and_covers_only_what_it_wrote():
    with pytest.raises(UpdateRejected, match=r"w13_weight \(unwritten: dim-0 index 1-3 of 4\)"):
        validate_update(FusedMoE(), moe_manifest(experts=[0]), partial=False)
    cov = validate_update(FusedMoE(), moe_manifest(experts=[0]), partial=True)
    expert_bytes = 2 * I * H * 4
    assert cov["w13_weight"] == ((0, expert_bytes),)
    assert missing_from(required_coverage(FusedMoE()), cov) == [
        "w13_weight (unwritten: dim-0 index 1-3 of 4)",
        "w2_weight (unwritten: dim-0 index 1-3 of 4)",
    ]


def test_each_half_of_a_fused_expert_counts_on_its_own():
    cov = validate_update(FusedMoE(), moe_manifest(projs=("w1", "w2")), partial=True)  # every w3 missing
    assert "part of dim-0 index 0, 1, 2, 3" in missing_from(required_coverage(FusedMoE()), cov)[0]
    validate_update(FusedMoE(), moe_manifest(), partial=False)  # all of them: complete


def test_expert_parallel_rank_needs_only_its_experts():
    rank = FusedMoE(local_experts=[2, 3])
    validate_update(rank, moe_manifest(), partial=False)  # the other experts reach the loader, which skips them
    with pytest.raises(UpdateRejected, match="w13_weight"):
        validate_update(rank, moe_manifest(experts=[0, 1, 2]), partial=False)


def test_strided_writes_and_zero_filled_padding_are_measured():
    class Columns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 6), requires_grad=False)
            self.w.weight_loader = self.loader

        def loader(self, param, loaded, half):  # left or right 3 columns; the last row is padding
            param.data[:3, 3 * half : 3 * half + 3].copy_(loaded)
            param.data[3:].fill_(0)

        def load_weights(self, weights):
            for name, t in weights:
                self.w.weight_loader(self.w, t, int(name[-1]))

    cov = validate_update(Columns(), [("w.0", "float32", [3, 3])], partial=True)
    assert cov["w"] == ((0, 12), (24, 36), (48, 60), (72, 96))
    validate_update(Columns(), [("w.0", "float32", [3, 3]), ("w.1", "float32", [3, 3])], partial=False)


def test_a_write_the_recorder_cannot_place_refuses_a_partial_update_only():
    class Accumulates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
            self.w.weight_loader = lambda param, loaded: param.data.add_(loaded)

        def load_weights(self, weights):
            for _, t in weights:
                self.w.weight_loader(self.w, t)

    with pytest.raises(UpdateRejected, match=r"cannot measure what this model's loaders write into 'w \(aten.add_"):
        validate_update(Accumulates(), [("w", "float32", [4])], partial=True)
    assert validate_update(Accumulates(), [("w", "float32", [4])], partial=False) == {"w": ((0, 16),)}


def test_view_runs_and_union():
    starts, ends = view_runs(offset=2, sizes=[3, 2], strides=[4, 1], itemsize=4)  # rows of 2 in a 4-wide matrix
    assert starts.tolist() == [8, 24, 40] and ends.tolist() == [16, 32, 48]
    assert view_runs(0, [2, 3], [3, 1], 2)[0].tolist() == [0]  # contiguous: one run
    assert union(((0, 4),), ((4, 8), (10, 12)), ((11, 20),)) == ((0, 8), (10, 20))
    assert describe_unwritten(((0, 4),), Extent(12, 3)) == "unwritten: dim-0 index 1-2 of 3"
    assert view_runs(0, [2, 4000, 1000], [1, 2, 8000], 1)[0].tolist() == [0]  # a permuted whole: one run
    assert view_runs(0, [5000, 1000], [2000, 2], 1) is None  # millions of scattered runs: not measured


# ---------------------------------------------------------------- one writer of the model at a time
class Big(torch.nn.Module):
    """Many parameters with their own loaders, so a dry run's window is wide."""

    def __init__(self, n=200):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(8), requires_grad=False) for _ in range(n)])
        for p in self.ps:
            p.weight_loader = lambda param, loaded: param.data.copy_(loaded)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, t in weights:
            params[name].weight_loader(params[name], t)


def test_real_loads_always_land_while_dry_runs_run_on_another_thread():
    model = Big()
    originals = {n: p.weight_loader for n, p in model.named_parameters()}
    manifest = [(n, "float32", [8]) for n, _ in model.named_parameters()]
    stop = threading.Event()

    def dry_runs():
        while not stop.is_set():
            validate_update(model, manifest, partial=False)

    threads = [threading.Thread(target=dry_runs) for _ in range(2)]  # two overlapping checks, as stage + trainer
    for t in threads:
        t.start()
    try:
        for value in range(1, 31):
            with observe(model):  # how every real load the plugin drives or observes runs
                model.load_weights([(n, torch.full((8,), float(value))) for n, _ in model.named_parameters()])
            written = np.array([p[0].item() for p in model.ps])
            assert (written == value).all(), f"load {value}: {(written != value).sum()} parameters not written"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {n: p.weight_loader for n, p in model.named_parameters()} == originals  # the true originals, always
