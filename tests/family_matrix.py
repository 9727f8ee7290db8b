"""The model-family matrix, in one process: every family's tiny checkpoint, the model built as SGLang builds it
on CPU (its own ServerArgs, ModelConfig and model loader), then

1. the plugin's check accepts the full checkpoint as a complete update;
2. it refuses the checkpoint with one tensor missing (a member of a pair the model fuses, where it has one);
3. a push through the real loader and receiver (every bucket as small as the largest tensor, so pairs and
   shards are split) into a model SGLang built on dummy weights leaves every parameter and buffer bit-identical
   to SGLang's own ``DefaultModelLoader`` load of the same files into a second instance;
4. for a hybrid family (linear attention or Mamba beside full attention), one mixer of a second checkpoint pushed
   as a partial update writes exactly what SGLang's own load of that checkpoint holds there (its loaders transform
   what they load: ``A_log`` -> ``-exp(A_log)``, fused input projections), and nothing else changes;
5. for a family whose experts transformers 5 stacks, the tensors as a trainer holds them (the ``state_dict()`` of
   the model transformers loads from the files) pushed into another model SGLang built on dummy weights leave it
   bit-identical to SGLang's own load of the files, or are refused naming a tensor.

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

from sglang_ckpt_plugin.server.trainer_names import expert_splits_for

from .family_configs import FAMILIES, LAYERS, LINEAR_MIXER, make_checkpoint


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

    def model_config(self, checkpoint: Path, quantization: str | None = None, load_format: str = "dummy"):
        """As the model runner prepares it on CPU (head counts SGLang pads for TP; the linear-attention ones)."""
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.configs.update_config import adjust_config_with_unaligned_cpu_tp

        config = ModelConfig.from_server_args(self.server_args(checkpoint, quantization))
        return adjust_config_with_unaligned_cpu_tp(config, LoadConfig(load_format=load_format), 1)

    def build(self, checkpoint: Path, load_format: str, quantization: str | None = None) -> torch.nn.Module:
        """``quantization``: SGLang's ``--quantization`` (e.g. ``fp8`` to quantize a float checkpoint online)."""
        from sglang.srt.configs.device_config import DeviceConfig
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.model_loader import get_model

        return get_model(
            model_config=self.model_config(checkpoint, quantization, load_format),
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


def differing(pushed: torch.nn.Module, reference: torch.nn.Module, names=None) -> list[str]:
    """Parameters and buffers (of ``names``, default all) that differ; those SGLang builds but never loads nor
    reads are left out (a dummy start leaves them random, a disk load at their initial value)."""
    from sglang_ckpt_plugin.server import sglang_compat as sg

    ours = {**dict(pushed.named_parameters()), **dict(pushed.named_buffers())}
    theirs = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:5]
    unread = sg.unread_parameters(pushed)
    names = ours.keys() if names is None else names
    return [name for name in names if name not in unread and not torch.equal(ours[name], theirs[name])]


def push_through_receiver(served: torch.nn.Module, checkpoint: Path, checked, load=None, partial: bool = False):
    """One push of ``checkpoint`` into ``served`` through the real loader and receiver, buckets as small as the
    largest tensor, the model loaded as the server's receive session loads it (postprocessed.ModelLoad; ``load``: a
    given one; ``partial``: checked as a partial update): (stats, loader errors, buckets)."""
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.postprocessed import ModelLoad
    from sglang_ckpt_plugin.server.validate import check_update

    from .inproc_session import run_session

    load = load or ModelLoad(served, torch.device("cpu"), checked.coverage, checked.writes)
    return run_session(
        checkpoint,
        served,
        bucket_size=max(t.nbytes for t in read_checkpoint(checkpoint)),
        validate=lambda m, asked_partial, allow_unused: check_update(served, m, partial or asked_partial, allow_unused),
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


def check_family(builder: SGLangBuilder, family: str, checkpoint: Path, second: Path | None = None) -> dict:
    """``second``: another checkpoint of the family, one of whose mixers is then pushed as a partial update."""
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
    if second is not None:
        record["partial"] = check_partial(builder, family, served, reference, second, checkpoint.parent)
    if expert_splits_for(served.config):
        record["trainer_form"] = check_trainer_form(builder, checkpoint, reference)
    return record


def check_trainer_form(builder: SGLangBuilder, checkpoint: Path, reference) -> dict:
    """A push of the tensors as a transformers 5 trainer holds them (``state_dict()`` of the model loaded from the
    files: each MoE layer's experts stacked into one tensor per projection) into a second model SGLang built on dummy
    weights: it must end bit-identical to SGLang's own load of the files, or be refused naming a tensor."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.validate import UpdateRejected, check_update

    held = {
        n: t.detach().contiguous() for n, t in AutoModelForCausalLM.from_pretrained(checkpoint).state_dict().items()
    }
    form = checkpoint.with_name(checkpoint.name + "-trainer")
    form.mkdir()
    save_file(held, form / "model.safetensors", metadata={"format": "pt"})
    served = builder.build(checkpoint, "dummy")
    manifest = [(t.name, t.dtype, list(t.shape)) for t in read_checkpoint(form)]
    try:
        checked = check_update(served, manifest, partial=False)
    except UpdateRejected as exc:
        return {"refused": str(exc)}
    before = differing(served, reference)
    _, errors, buckets = push_through_receiver(served, form, checked)
    return {
        "differed_before": len(before),
        "stacked": sorted(n for n in held if any(n.endswith(s.fused) for s in expert_splits_for(served.config))),
        "loader_errors": [str(e) for e in errors],
        "buckets": buckets,
        "differing_after": differing(served, reference),
    }


def check_partial(builder: SGLangBuilder, family: str, served, reference, second: Path, root: Path) -> dict:
    """A partial update: one linear-attention (or Mamba) mixer of a second checkpoint pushed into ``served`` (which
    holds the first): what the check counts written must equal SGLang's own load of the second checkpoint, and
    everything else must still equal the first's."""
    from safetensors.torch import load_file, save_file

    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.validate import check_update

    prefix = LINEAR_MIXER[family]
    mixer = {
        n: t for f in sorted(second.glob("*.safetensors")) for n, t in load_file(f).items() if n.startswith(prefix)
    }
    part = root / f"{family}-mixer"
    part.mkdir()
    save_file(mixer, part / "model.safetensors", metadata={"format": "pt"})
    manifest = [(t.name, t.dtype, list(t.shape)) for t in read_checkpoint(part)]
    checked = check_update(served, manifest, partial=True)
    _, errors, _ = push_through_receiver(served, part, checked, partial=True)
    second_reference = builder.build(second, "auto")
    written = sorted(checked.coverage)
    held = [*(n for n, _ in served.named_parameters()), *(n for n, _ in served.named_buffers())]
    others = [n for n in held if n not in checked.coverage]
    return {
        "pushed": sorted(mixer),
        "written": written,
        "loader_errors": [str(e) for e in errors],
        "written_differs_from_second": differing(served, second_reference, written),
        "others_differ_from_first": differing(served, reference, others),
    }


def main(out_path: str, root: str) -> None:
    root_dir = Path(root)
    checkpoints, seconds, records = {}, {}, []
    for i, family in enumerate(FAMILIES):
        try:
            checkpoints[family] = make_checkpoint(root_dir / family, family, seed=10 + i)
            if family in LINEAR_MIXER:
                seconds[family] = make_checkpoint(root_dir / f"{family}-second", family, seed=100 + i)
        except Exception as exc:  # noqa: BLE001 - transformers cannot make this tiny config
            records.append({"family": family, "make_error": f"{type(exc).__name__}: {exc}"[:500]})
    builder = SGLangBuilder(next(iter(checkpoints.values())))
    for family, checkpoint in checkpoints.items():
        try:
            records.append(check_family(builder, family, checkpoint, seconds.get(family)))
        except Exception:  # noqa: BLE001 - reported per family
            records.append({"family": family, "error": traceback.format_exc()[-3000:]})
        print(json.dumps(records[-1])[:300], flush=True)
    Path(out_path).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
