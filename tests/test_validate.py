"""Unit tests: the pre-update dry run, on a module that loads the way SGLang models do (params_dict lookup,
stacked q/k/v into one parameter through a weight_loader, default loader otherwise)."""

import pytest
import torch

from sglang_ckpt_plugin.server.validate import UpdateRejected, validate_update


def default_weight_loader(param, loaded_weight):
    assert param.size() == loaded_weight.size()
    param.data.copy_(loaded_weight)


class SGLangStyle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(12, 4))
        self.norm = torch.nn.Parameter(torch.zeros(4))

        def qkv_loader(param, loaded, shard_id):
            start = {"q": 0, "k": 4, "v": 8}[shard_id]
            param.data[start : start + 4].copy_(loaded)

        self.qkv.weight_loader = qkv_loader

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, w in weights:
            if name.endswith("inv_freq"):
                continue
            for short in ("q", "k", "v"):
                if name == f"{short}_proj":
                    params["qkv"].weight_loader(params["qkv"], w, short)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, w)


FULL = [
    ("q_proj", "float32", [4, 4]),
    ("k_proj", "float32", [4, 4]),
    ("v_proj", "float32", [4, 4]),
    ("norm", "float32", [4]),
    ("layers.0.rotary_emb.inv_freq", "float32", [2]),
]


def test_complete_update_passes_and_writes_nothing():
    model = SGLangStyle()
    validate_update(model, FULL, partial=False)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    assert "weight_loader" not in model.norm.__dict__ and callable(model.qkv.weight_loader)  # loaders restored


@pytest.mark.parametrize(
    "manifest,partial,match",
    [
        (FULL[:3] + FULL[4:], False, "does not cover 1 parameter.*'norm'"),
        (FULL + [("bogus", "float32", [1])], False, "'bogus' is not a weight"),
        (FULL[:3] + [("norm", "float32", [5])], False, "shape mismatch.*'norm'"),
        (FULL + [("norm", "float32", [4])], False, "duplicate tensor names.*'norm'"),
    ],
)
def test_rejections_name_the_tensor(manifest, partial, match):
    with pytest.raises(UpdateRejected, match=match):
        validate_update(SGLangStyle(), manifest, partial)


def test_missing_allowed_for_explicit_partial_update():
    validate_update(SGLangStyle(), [("norm", "float32", [4])], partial=True)
    with pytest.raises(UpdateRejected, match="does not cover 1 parameter.*'qkv'"):
        validate_update(SGLangStyle(), [("norm", "float32", [4])], partial=False)


def test_loader_that_writes_the_live_parameter_itself_is_measured_and_never_executed():
    class Bypass(SGLangStyle):
        def load_weights(self, weights):
            for name, w in weights:
                dict(self.named_parameters())[name].data.copy_(w)

    model = Bypass()
    assert validate_update(model, [("norm", "float32", [4])], partial=True) == {"norm": ((0, 16),)}
    assert torch.count_nonzero(model.norm) == 0
    with pytest.raises(UpdateRejected, match="does not cover 1 parameter.*'qkv'"):
        validate_update(model, [("norm", "float32", [4])], partial=False)


class QLoRA(torch.nn.Module):
    """Loads like SGLang's DeepSeek-V3 attention: ``q_a_proj`` and ``kv_a_proj_with_mqa`` are kept until both have
    arrived in one ``load_weights`` call, then written as one ``torch.cat`` into ``fused``; a norm whose loader is a
    method of its module refreshes a derived buffer (Gemma's norms); ``post_load_weights`` derives a cache from
    the served weights (DeepSeek's w_kc)."""

    def __init__(self):
        super().__init__()
        self.fused = torch.nn.Parameter(torch.zeros(6, 4), requires_grad=False)
        self.norm = Norm()
        self.derived = torch.zeros(6, 4)
        self.post_loads = 0

    def load_weights(self, weights):
        cached = {}
        for name, w in weights:
            if name in ("q_a", "kv_a"):
                cached[name] = w
                if len(cached) == 2:
                    self.fused.data.copy_(torch.cat([cached["q_a"], cached["kv_a"]]))
            else:
                self.norm.weight.weight_loader(self.norm.weight, w)
        self.post_load_weights()

    def post_load_weights(self):
        self.post_loads += 1
        self.derived.copy_(self.fused * 2)


class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        self.register_buffer("plus_one", torch.ones(4))
        self.weight.weight_loader = self._load

    def _load(self, param, loaded):
        param.data.copy_(loaded)
        self.plus_one.copy_(self.weight.data).add_(1.0)


PAIR = [("kv_a", "float32", [2, 4]), ("norm.weight", "float32", [4]), ("q_a", "float32", [4, 4])]


def test_a_pair_the_model_fuses_is_checked_as_the_whole_update_loads_it_in_either_order():
    from sglang_ckpt_plugin.server.validate import check_update

    model = QLoRA()
    for manifest in (PAIR, PAIR[::-1]):
        checked = check_update(model, manifest, partial=False)
        assert checked.coverage == {"fused": ((0, 96),), "norm.weight": ((0, 16),)}
        assert checked.together == (frozenset({"q_a", "kv_a"}),)
    # nothing of the live model changed: its parameters, its module-held buffer, its derived cache
    assert torch.count_nonzero(model.fused) == 0 and torch.all(model.norm.plus_one == 1)
    assert model.post_loads == 0 and torch.count_nonzero(model.derived) == 0
    with pytest.raises(UpdateRejected, match="not weights of this model.*'q_a'.*fuses tensors loaded together"):
        validate_update(model, [m for m in PAIR if m[0] != "kv_a"], partial=True)
    with pytest.raises(UpdateRejected, match="does not cover 1 parameter.*'fused'"):
        validate_update(model, [m for m in PAIR if m[0] != "kv_a"], partial=False, allow_unused=True)


def test_multi_token_prediction_layers_are_skipped_on_purpose():
    from types import SimpleNamespace

    from sglang_ckpt_plugin.server.validate import skipped_on_purpose

    v3 = SimpleNamespace(num_hidden_layers=2, num_nextn_predict_layers=1, tie_word_embeddings=False)
    assert skipped_on_purpose("model.layers.2.eh_proj.weight", v3)
    assert not skipped_on_purpose("model.layers.1.self_attn.q_a_proj.weight", v3)
    assert not skipped_on_purpose("model.layers.2.mlp.weight", SimpleNamespace(num_hidden_layers=2))
    assert skipped_on_purpose("lm_head.weight", SimpleNamespace(tie_word_embeddings=True))
    assert skipped_on_purpose("lm_head.weight", SimpleNamespace(tie_word_embeddings=False), own_lm_head=False)
    assert not skipped_on_purpose("lm_head.weight", SimpleNamespace(tie_word_embeddings=False))


def test_tensor_the_model_silently_drops_is_unknown_unless_allowed():
    class Drops(SGLangStyle):
        def load_weights(self, weights):
            super().load_weights([(n, w) for n, w in weights if n != "extra"])

    manifest = FULL + [("extra", "float32", [3])]
    with pytest.raises(UpdateRejected, match="not weights of this model.*'extra'"):
        validate_update(Drops(), manifest, partial=False)
    validate_update(Drops(), manifest, partial=False, allow_unused=True)


# ---------------------------------------------------------------- coverage per parameter and per stacked shard
class FusedQKV(torch.nn.Module):
    """Marks itself the way SGLang's QKVParallelLinear does (output_sizes + q_proj_shard_size)."""

    def __init__(self):
        super().__init__()
        self.output_sizes = [4, 4, 4]
        self.q_proj_shard_size = 4
        self.weight = torch.nn.Parameter(torch.zeros(12, 4))


class Stacked(SGLangStyle):
    """qkv is a fused layer loaded shard by shard; norm is loaded whole."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.attn = FusedQKV()
        self.norm = torch.nn.Parameter(torch.zeros(4))

        def qkv_loader(param, loaded, shard_id):
            start = {"q": 0, "k": 4, "v": 8}[shard_id]
            param.data[start : start + 4].copy_(loaded)

        self.attn.weight.weight_loader = qkv_loader

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, w in weights:
            if name in ("q_proj", "k_proj", "v_proj"):
                params["attn.weight"].weight_loader(params["attn.weight"], w, name[0])
            else:
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], w)


STACKED = [
    ("q_proj", "float32", [4, 4]),
    ("k_proj", "float32", [4, 4]),
    ("v_proj", "float32", [4, 4]),
    ("norm", "float32", [4]),
]


QKV_FULL = ((0, 192),)  # 12 x 4 float32
NORM_FULL = ((0, 16),)


def test_required_coverage_is_every_byte_of_every_parameter():
    from sglang_ckpt_plugin.server.coverage import Extent
    from sglang_ckpt_plugin.server.validate import required_coverage

    assert required_coverage(Stacked()) == {"attn.weight": Extent(192, 12), "norm": Extent(16, 4)}


def test_a_missing_stacked_shard_is_missing():
    cov = validate_update(Stacked(), STACKED, partial=False)
    assert cov == {"attn.weight": QKV_FULL, "norm": NORM_FULL}
    with pytest.raises(
        UpdateRejected, match=r"does not cover 1 parameter.*attn.weight \(unwritten: dim-0 index 8-11 of 12\)"
    ):
        validate_update(Stacked(), [m for m in STACKED if m[0] != "v_proj"], partial=False)
    assert validate_update(Stacked(), STACKED[:2], partial=True) == {"attn.weight": ((0, 128),)}


def test_partial_pushes_that_together_cover_the_model_make_it_complete():
    from sglang_ckpt_plugin.server.validate import required_coverage
    from sglang_ckpt_plugin.server.weights_state import WeightsState

    model = Stacked()
    state = WeightsState(required_coverage(model), complete=False)
    assert state.report().state == "waiting" and state.report().missing_count == 2
    state.succeeded(validate_update(model, STACKED[:2], partial=True), "ipc", "q and k")
    report = state.report()
    assert report.state == "waiting" and sorted(report.missing) == [
        "attn.weight (unwritten: dim-0 index 8-11 of 12)",
        "norm",
    ]
    state.succeeded(validate_update(model, STACKED[2:], partial=True), "ipc", "v and norm")
    assert state.complete and state.report().state == "complete"


def test_zero_tensor_or_partial_update_never_completes_a_waiting_model():
    from sglang_ckpt_plugin.server.validate import required_coverage
    from sglang_ckpt_plugin.server.weights_state import WeightsState

    state = WeightsState(required_coverage(Stacked()), complete=False)
    state.succeeded({}, "ipc", "nothing", fingerprint="abc")
    state.succeeded({"norm": NORM_FULL}, "ipc", "norm only")
    assert state.report().state == "waiting" and state.report().fingerprint is None


def test_failure_partway_takes_back_what_the_update_meant_to_write():
    from sglang_ckpt_plugin.server.validate import required_coverage
    from sglang_ckpt_plugin.server.weights_state import WeightsState

    state = WeightsState(required_coverage(Stacked()), complete=True)
    state.failed_partway({"norm": NORM_FULL}, "ipc", "loader died")
    report = state.report()
    assert report.state == "incomplete" and report.missing == ["norm"] and report.last_update.outcome == "incomplete"
    state.succeeded({"norm": NORM_FULL}, "ipc", "norm again")  # rewriting what it meant to write heals it
    assert state.report().state == "complete"
    state.failed_partway(None, "disk", "unknown")  # unknown plan: everything must be written again
    assert state.report().missing_count == 2


def test_trainer_session_counts_only_when_it_ends_without_failure():
    from sglang_ckpt_plugin.server.validate import required_coverage
    from sglang_ckpt_plugin.server.weights_state import WeightsState

    state = WeightsState(required_coverage(Stacked()), complete=False)
    state.begin_session()
    state.session_loaded({"attn.weight": ((0, 64),), "norm": NORM_FULL})
    state.session_loaded({"attn.weight": ((64, 192),)})
    assert state.report().state == "waiting" and state.report().session_open
    state.end_session("trainer")
    assert state.report().state == "complete" and not state.report().session_open
    # a refused bucket after a loaded one: the loaded parameters now hold a mix
    state.begin_session()
    state.session_loaded({"norm": NORM_FULL})
    state.session_bucket_failed({"attn.weight": ((0, 64),)}, False, "trainer", "rejected")
    state.end_session("trainer")
    assert state.report().state == "incomplete" and state.report().missing == ["norm"]
    # a refused first bucket changes nothing
    state.succeeded({"norm": NORM_FULL}, "ipc", "heal")
    state.begin_session()
    state.session_bucket_failed({"norm": NORM_FULL}, False, "trainer", "rejected")
    state.end_session("trainer")
    assert state.report().state == "complete" and state.last_update.outcome == "rejected"


def test_fingerprint_only_for_a_verified_update_that_covered_the_model():
    from sglang_ckpt_plugin.server.validate import required_coverage
    from sglang_ckpt_plugin.server.weights_state import WeightsState

    state = WeightsState(required_coverage(Stacked()), complete=False)
    full = {"attn.weight": QKV_FULL, "norm": NORM_FULL}
    state.succeeded(full, "ipc", "verified", fingerprint="f00d")
    assert state.report().fingerprint == "f00d"
    state.succeeded({"norm": NORM_FULL}, "ipc", "partial, verified", fingerprint="beef")
    assert state.report().fingerprint is None  # the served weights are no longer one verified checkpoint


def test_observe_records_what_reached_load_weights_and_can_refuse_first():
    from sglang_ckpt_plugin.server.validate import observe

    model = Stacked()
    with observe(model, lambda manifest: validate_update(model, manifest, partial=True)) as seen:
        model.load_weights([("norm", torch.ones(4))])
    assert seen.touched and seen.coverage == {"norm": NORM_FULL} and torch.all(model.norm == 1)
    assert "load_weights" not in model.__dict__  # the model's own method again
    with observe(model, lambda manifest: validate_update(model, manifest, partial=True)) as seen:
        with pytest.raises(UpdateRejected):
            model.load_weights([("bogus", torch.ones(4))])
    assert not seen.touched
