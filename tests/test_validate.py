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


FULL = [("q_proj", "float32", [4, 4]), ("k_proj", "float32", [4, 4]), ("v_proj", "float32", [4, 4]),
        ("norm", "float32", [4]), ("layers.0.rotary_emb.inv_freq", "float32", [2])]  # fmt: skip


def test_complete_update_passes_and_writes_nothing():
    model = SGLangStyle()
    validate_update(model, FULL, partial=False)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    assert "weight_loader" not in model.norm.__dict__ and callable(model.qkv.weight_loader)  # loaders restored


@pytest.mark.parametrize("manifest,partial,match", [
    (FULL[:3] + FULL[4:], False, "does not cover 1 parameter.*'norm'"),
    (FULL + [("bogus", "float32", [1])], False, "'bogus' is not a weight"),
    (FULL[:3] + [("norm", "float32", [5])], False, "shape mismatch.*'norm'"),
    (FULL + [("norm", "float32", [4])], False, "duplicate tensor names.*'norm'"),
])  # fmt: skip
def test_rejections_name_the_tensor(manifest, partial, match):
    with pytest.raises(UpdateRejected, match=match):
        validate_update(SGLangStyle(), manifest, partial)


def test_missing_allowed_for_explicit_partial_update():
    validate_update(SGLangStyle(), [("norm", "float32", [4])], partial=True)
    with pytest.raises(UpdateRejected, match="does not cover 1 parameter.*'qkv'"):
        validate_update(SGLangStyle(), [("norm", "float32", [4])], partial=False)


def test_loader_that_bypasses_weight_loader_cannot_write_during_the_dry_run():
    class Bypass(SGLangStyle):
        def load_weights(self, weights):
            for name, w in weights:
                dict(self.named_parameters())[name].data.copy_(w)

    model = Bypass()
    with pytest.raises(UpdateRejected, match="does not fit"):
        validate_update(model, [("norm", "float32", [4])], partial=True)
    assert torch.count_nonzero(model.norm) == 0


def test_tensor_the_model_silently_drops_is_unknown_unless_allowed():
    class Drops(SGLangStyle):
        def load_weights(self, weights):
            super().load_weights([(n, w) for n, w in weights if n != "extra"])

    manifest = FULL + [("extra", "float32", [3])]
    with pytest.raises(UpdateRejected, match="not weights of this model.*'extra'"):
        validate_update(Drops(), manifest, partial=False)
    validate_update(Drops(), manifest, partial=False, allow_unused=True)
