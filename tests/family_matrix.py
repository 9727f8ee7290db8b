"""The model-family matrix, in one process: every family's tiny checkpoint, the model built as SGLang builds it
on CPU (its own ServerArgs, ModelConfig and model loader), then

1. the plugin's check accepts the full checkpoint as a complete update;
2. it refuses the checkpoint with one tensor missing (a member of a pair the model fuses, where it has one);
3. a push through the real loader and receiver (every bucket as small as the largest tensor, so pairs and
   shards are split) into a model SGLang built on dummy weights leaves every parameter and buffer bit-identical
   to SGLang's own ``DefaultModelLoader`` load of the same files into a second instance.

    python -m tests.family_matrix OUT.json CKPT_ROOT

Writes one record per family (its errors as text: a family SGLang itself cannot load is listed with SGLang's
error). Run by test_family_matrix.py; needs the CPU environment (cpu_env) of the server.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB = 64, 2, 256
HEADS, KV_HEADS = 4, 2
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    moe_layer_freq=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    rope_scaling={
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 1.0,
        "original_max_position_embeddings": 2048,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)

# family -> (HF model_type, config fields beyond the common sizes)
FAMILIES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3-moe": ("qwen3_moe", {"head_dim": 16, **MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {"n_inner": 2 * HIDDEN, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": ("olmo2", {}),
    "olmoe": ("olmoe", {"num_key_value_heads": HEADS, "num_experts": 4, "num_experts_per_tok": 2}),
    "starcoder2": ("starcoder2", {"use_bias": True}),
    "granite": ("granite", {}),
    "stablelm": ("stablelm", {}),
    "smollm3": ("smollm3", {}),
    "glm4": ("glm4", {"head_dim": 16}),
    "glm4-moe": (
        "glm4_moe",
        {
            "head_dim": 16,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "qwen2-moe": (
        "qwen2_moe",
        {**MOE, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": []},
    ),
    "phimoe": ("phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "gpt-oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8}),
    "deepseek-v2": (
        "deepseek_v2",
        {**MLA, "q_lora_rank": None, "num_key_value_heads": HEADS, "scoring_func": "softmax", "topk_method": "greedy"},
    ),
    "deepseek-v3": (
        "deepseek_v3",
        {
            **MLA,
            "q_lora_rank": 32,
            "num_key_value_heads": HEADS,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 1,
        },
    ),
}


def hf_config(family: str):
    from transformers import AutoConfig

    model_type, fields = FAMILIES[family]
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=torch.float32,
    )
    return AutoConfig.for_model(model_type, **{**common, **fields})


class SGLangBuilder:
    """Models of any family built as SGLang's model runner builds them, in this one process (CPU, TP=1), with the
    plugins loaded as in a scheduler process of a server started with ``--wait-for-initial-weights``."""

    def __init__(self, first_checkpoint: Path):
        from sglang.srt.distributed import bootstrap
        from sglang.srt.plugins import load_plugins
        from sglang.srt.runtime_context import SpawnRanks, publish

        from sglang_ckpt_plugin.loader.http import free_port

        load_plugins()
        args = self.server_args(first_checkpoint)
        publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
        bootstrap.init_parallel_runtime(server_args=args, device="cpu", dist_port=free_port())
        bootstrap.init_layer_runtime(model_config=self.model_config(first_checkpoint))

    @staticmethod
    def server_args(checkpoint: Path, quantization: str | None = None):
        from sglang.srt.server_args import ServerArgs

        return ServerArgs(
            model_path=str(checkpoint),
            device="cpu",
            load_format="dummy",
            max_total_tokens=4096,
            checkpoint_engine_wait_weights_before_ready=True,
            quantization=quantization,
        )

    def model_config(self, checkpoint: Path, quantization: str | None = None):
        from sglang.srt.configs.model_config import ModelConfig

        return ModelConfig.from_server_args(self.server_args(checkpoint, quantization))

    def build(self, checkpoint: Path, load_format: str, quantization: str | None = None) -> torch.nn.Module:
        """``quantization``: SGLang's ``--quantization`` (e.g. ``fp8`` to quantize a float checkpoint online)."""
        from sglang.srt.configs.device_config import DeviceConfig
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.model_loader import get_model

        return get_model(
            model_config=self.model_config(checkpoint, quantization),
            load_config=LoadConfig(load_format=load_format),
            device_config=DeviceConfig("cpu"),
        )


def victim(manifest: list, together) -> str:
    """The tensor the refused update lacks: a member of a fused pair where the model has one, else one of the
    last layer's."""
    if together:
        return sorted(together[0])[0]
    last = [name for name, _, _ in manifest if f"layers.{LAYERS - 1}." in name or f"h.{LAYERS - 1}." in name]
    return (last or [manifest[-1][0]])[len(last) // 2 if last else 0]


def differing(pushed: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    ours = {**dict(pushed.named_parameters()), **dict(pushed.named_buffers())}
    theirs = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:5]
    return [name for name in ours if not torch.equal(ours[name], theirs[name])]


def push_through_receiver(served: torch.nn.Module, checkpoint: Path, checked, load=None):
    """One push of ``checkpoint`` into ``served`` through the real loader and receiver, buckets as small as the
    largest tensor, the model loaded as the server's receive session loads it (postprocessed.ModelLoad; ``load``: a
    given one): (stats, loader errors, buckets)."""
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.postprocessed import ModelLoad
    from sglang_ckpt_plugin.server.validate import check_update

    from .inproc_session import run_session

    load = load or ModelLoad(served, torch.device("cpu"), checked.coverage, checked.writes)
    return run_session(
        checkpoint,
        served,
        bucket_size=max(t.nbytes for t in read_checkpoint(checkpoint)),
        validate=lambda m, partial, allow_unused: check_update(served, m, partial, allow_unused),
        prepare=load.prepare,
        post=load.post_process,
        load_weights=lambda views: load.load([n for n, _ in views], lambda: served.load_weights(views)),
    )


def run_matrix(module: str, out_dir: Path) -> list[dict]:
    """``python -m <module> OUT CKPTS`` in the server's CPU environment: its records."""
    import subprocess

    from sglang_ckpt_plugin.demo.launch import server_env

    out = out_dir / "records.json"
    proc = subprocess.run(
        [sys.executable, "-m", module, str(out), str(out_dir / "ckpts")],
        cwd=Path(__file__).resolve().parents[1],
        env=server_env("cpu"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def check_family(builder: SGLangBuilder, family: str, checkpoint: Path) -> dict:
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.validate import UpdateRejected, check_update

    record: dict = {"family": family}
    try:
        served = builder.build(checkpoint, "dummy")
        reference = builder.build(checkpoint, "auto")
    except Exception as exc:  # SGLang itself cannot build or load this family here
        return {**record, "sglang_error": f"{type(exc).__name__}: {exc}"[:500]}
    record["architecture"] = type(served).__name__
    tensors = read_checkpoint(checkpoint)
    manifest = [(t.name, t.dtype, list(t.shape)) for t in tensors]
    try:
        checked = check_update(served, manifest, partial=False)
        record["full"] = "accepted"
        record["together"] = [sorted(g) for g in checked.together]
    except UpdateRejected as exc:
        return {**record, "full": f"refused: {exc}"}
    lacks = victim(manifest, checked.together)
    record["lacks"] = lacks
    try:
        check_update(served, [m for m in manifest if m[0] != lacks], partial=False)
        record["lacking"] = "accepted"
    except UpdateRejected as exc:
        record["lacking"] = f"refused: {exc}"
    before = differing(served, reference)
    _, errors, buckets = push_through_receiver(served, checkpoint, checked)
    record.update(
        buckets=buckets,
        loader_errors=[str(e) for e in errors],
        differed_before=len(before),
        differing_after=differing(served, reference),
    )
    return record


def main(out_path: str, root: str) -> None:
    from sglang_ckpt_plugin.demo.tiny_model import make_tiny_model

    root_dir = Path(root)
    checkpoints, records = {}, []
    for i, family in enumerate(FAMILIES):
        try:
            checkpoints[family] = make_tiny_model(root_dir / family, family, seed=10 + i, config=hf_config(family))
        except Exception as exc:  # noqa: BLE001 - transformers cannot make this tiny config
            records.append({"family": family, "make_error": f"{type(exc).__name__}: {exc}"[:500]})
    builder = SGLangBuilder(next(iter(checkpoints.values())))
    for family, checkpoint in checkpoints.items():
        try:
            records.append(check_family(builder, family, checkpoint))
        except Exception:  # noqa: BLE001 - reported per family
            records.append({"family": family, "error": traceback.format_exc()[-3000:]})
        print(json.dumps(records[-1])[:300], flush=True)
    Path(out_path).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
