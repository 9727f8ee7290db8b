"""Vision-language models served on this CPU: a tiny Qwen2.5-VL, Qwen3-VL and Gemma-3 (vision tower, language model,
processor files) on dummy weights behind the gate. A push equals SGLang without the plugin on the same files and
SGLang's own disk reload, by /weights_checker checksums (the vision tower's parameters included) and greedy output for
a text request and for a request with an image; a push lacking a vision tensor is refused by name and the gate stays
shut.

SGLang's Qwen-VL processor imports models/qwen3_5.py, which looks up CPU kernels at import that this environment does
not have: the CPU half of the plugin places raising placeholders for them (cpu_support/kernels.py), without which no
Qwen-VL server starts here, with or without the plugin.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_ckpt_plugin.cpu_env import core_binds
from sglang_ckpt_plugin.demo.evidence import checksum, reload_from_disk
from sglang_ckpt_plugin.demo.launch import PLUGIN_FREE, SGLangServer, generate_ids
from sglang_ckpt_plugin.demo.tiny_vlm import FAMILIES, make_image, make_tiny_vlm

from .conftest import fault_plugin_env, our_leftovers, push

pytestmark = pytest.mark.slow

TEXT_PROMPT = [1, 20, 30, 40, 50]  # plain words: no special token
NEW_TOKENS = 8
# a vision tensor of each family's checkpoint, and what of its name a refusal must show (SGLang's parameter name)
VISION_TENSOR = {
    "qwen2_5_vl": ("visual.blocks.0.mlp.down_proj.weight", "visual.blocks.0.mlp.down_proj"),
    "qwen3_vl": ("model.visual.blocks.0.mlp.linear_fc2.weight", "visual.blocks.0.mlp.linear_fc2"),
    "gemma3": ("vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight", "vision_model.encoder.layers.0.mlp.fc2"),
}


# Qwen2.5-VL's servers run at TP=2 (vision tower and language model sharded; one loader process feeds both ranks)
TP_SIZE = {"qwen2_5_vl": 2, "qwen3_vl": 1, "gemma3": 1}


def ranks(family: str) -> list[str]:
    """The loader's flag for the family's server size."""
    return ["--inference-parallel-size", str(TP_SIZE[family])]


@pytest.fixture(scope="module", params=list(VISION_TENSOR))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def vlms(family, ckpt_root):
    return tuple(make_tiny_vlm(ckpt_root / f"{family}_{seed}", family, seed=seed) for seed in (0, 1))


@pytest.fixture(scope="module")
def images(family, tmp_path_factory):
    where, side = tmp_path_factory.mktemp("images"), FAMILIES[family]["image_side"]
    return make_image(where / "one.png", seed=0, size=side), make_image(where / "two.png", seed=1, size=side)


@pytest.fixture(scope="module")
def server(vlms, family, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / f"{family}_server.log"
    with SGLangServer(vlms[0], log, tp_size=TP_SIZE[family], extra_args=FAMILIES[family]["server_args"]) as srv:
        srv.wait_listening()
        yield srv
    assert srv.group_pids() == [], "server processes left behind"


def image_ids(url: str, image, family: str) -> list[int]:
    body = {
        "text": FAMILIES[family]["image_prompt"],
        "image_data": str(image),
        "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    resp.raise_for_status()
    return resp.json()["output_ids"]


def observe(url: str, image, family: str) -> tuple:
    """What a server shows of its weights: every parameter's checksum, greedy ids for text and for an image."""
    return checksum(url), generate_ids(url, TEXT_PROMPT, NEW_TOKENS)["output_ids"], image_ids(url, image, family)


def test_a_push_lacking_a_vision_tensor_is_refused_by_name_and_the_gate_stays_shut(server, vlms, family, tmp_path):
    dropped, named = VISION_TENSOR[family]
    bad = tmp_path / "no_vision_tensor"
    shutil.copytree(vlms[1], bad, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(vlms[1] / "model.safetensors")
    assert dropped in tensors
    save_file({k: v for k, v in tensors.items() if k != dropped}, bad / "model.safetensors")
    before = set(our_leftovers())
    proc = push(server.url, bad, *ranks(family), "--weight-version", "no-vision", check=False)
    assert proc.returncode == 1 and "does not cover 1 parameter" in proc.stderr, proc.stderr
    assert named in proc.stderr, proc.stderr
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
    assert set(our_leftovers()) - before == set()


# A server without the plugin is the reference for these (it costs a minute each); Qwen3-VL's pushes are compared
# with SGLang's own reload only (they equalled a plugin-free server when its family was added).
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"], indirect=True)
def test_a_push_serves_what_sglang_without_the_plugin_serves_text_and_image(
    server, vlms, family, images, tmp_path, fault_dir
):
    push(server.url, vlms[0], *ranks(family), "--weight-version", "a")
    server.wait_healthy(timeout_s=120)
    pushed = observe(server.url, images[0], family)
    env = {"SGLANG_PLUGINS": PLUGIN_FREE}
    flags, tp = FAMILIES[family]["server_args"], TP_SIZE[family]
    if tp > 1:  # SGLang alone cannot start --tp 2 on a CPU: the test-only plugin turns pynccl off, cores bound
        env = {
            **fault_plugin_env(fault_dir),
            "SGLANG_PLUGINS": f"{PLUGIN_FREE},ckpt_test_gloo_tp",
            "SGLANG_CPU_OMP_THREADS_BIND": core_binds(tp),
        }
    with SGLangServer(
        vlms[0], tmp_path / "plain_vlm.log", wait_for_weights=False, tp_size=tp, env=env, extra_args=flags
    ) as plain:
        plain.wait_healthy()
        assert "ckpt_plugin" not in httpx.get(f"{plain.url}/model_info", timeout=30).json()
        reference = observe(plain.url, images[0], family)
    assert plain.group_pids() == []
    assert pushed == reference


def test_a_push_equals_sglangs_own_reload_and_the_image_matters(server, vlms, family, images):
    push(server.url, vlms[0], *ranks(family), "--weight-version", "a")
    served_a = observe(server.url, images[0], family)
    push(server.url, vlms[1], *ranks(family), "--weight-version", "b", "--transfer", "copy")
    pushed = observe(server.url, images[0], family)
    assert pushed[0] != served_a[0] and pushed[2] != served_a[2], "the push did not change what is served"
    assert image_ids(server.url, images[1], family) != pushed[2], "the image made no difference to the answer"
    reload_from_disk(server.url, vlms[1])
    assert observe(server.url, images[0], family) == pushed


TRAINER_VISION_PREFIX = {"qwen2_5_vl": "model.visual.", "qwen3_vl": "model.visual.", "gemma3": "model.vision_tower."}


def trainer_model(family: str, checkpoint):
    """The checkpoint as a trainer holds it: transformers 5's model of the family, loaded from the files."""
    import transformers

    return getattr(transformers, FAMILIES[family]["classes"][1]).from_pretrained(checkpoint, dtype="auto")


def test_a_trainers_own_names_push_equal_to_sglangs_reload_and_a_stray_one_is_refused_by_name(
    server, vlms, family, images
):
    from sglang_ckpt_plugin.loader.push import PushError
    from sglang_ckpt_plugin.local_push import LocalPush

    trainer = trainer_model(family, vlms[1])
    named = [(name, p.detach()) for name, p in trainer.named_parameters()]
    names = {name for name, _ in named}
    vision = TRAINER_VISION_PREFIX[family]
    assert any(n.startswith("model.language_model.") for n in names), sorted(names)[:3]  # not the files' names
    assert any(n.startswith(vision) for n in names), sorted(names)[:3]
    push(server.url, vlms[0], *ranks(family), "--weight-version", "a")
    served_a = observe(server.url, images[0], family)
    with LocalPush(server.url, bucket_bytes=200_000) as local:
        stray = (f"{vision}no_such_proj.weight", torch.zeros(4))
        with pytest.raises(PushError, match="weights? of this model") as refused:
            local.push([*named, stray], weight_version="stray")
        assert repr(stray[0]) in str(refused.value)  # named as the trainer sent it
        assert observe(server.url, images[0], family) == served_a  # refused before anything was written
        local.push(named, weight_version="trainer-b")
    pushed = observe(server.url, images[0], family)
    assert pushed[0] != served_a[0], "the push did not change what is served"
    reload_from_disk(server.url, vlms[1])
    assert observe(server.url, images[0], family) == pushed
