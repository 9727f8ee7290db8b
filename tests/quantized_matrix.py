"""The quantized rows of the family matrix, in one process: models built as SGLang builds them on CPU (block-FP8
dense Qwen3, Qwen3-MoE and DeepSeek-V3 with MLA and a shared expert; a bfloat16 Qwen3 quantized online with
``--quantization fp8``), started on dummy weights as a server waiting for its weights (post-processed at start), then
pushed A, B, A through the real loader and receiver. After each push every parameter, buffer and derived tensor
(DeepSeek's ``w_kc``/``w_vc``) must be bit-identical to SGLang's own fresh load of the same files into a second
instance, and must have changed. Also: a complete update lacking one tensor of a quantized module is refused, and
a partial update writing part of one is refused in words.

    python -m tests.quantized_matrix OUT.json CKPT_ROOT

Run by test_quantized_matrix.py in the CPU environment (cpu_env), where FP8 runs on the plain-torch kernels.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

from .family_matrix import SGLangBuilder, push_through_receiver

# row -> (float arch, block-FP8 checkpoint or a bfloat16 one served with --quantization fp8)
ROWS = {
    "fp8-qwen3": ("qwen3", "block"),
    "fp8-qwen3-moe": ("qwen3_moe", "block"),
    "fp8-deepseek-v3": ("deepseek_v3", "block"),
    "online-fp8-qwen3": ("qwen3", "online"),
}


def checkpoints(root: Path, row: str) -> tuple[Path, Path]:
    from sglang_ckpt_plugin.demo.tiny_quantized import make_tiny_fp8_model

    arch, kind = ROWS[row]
    made = [make_tiny_fp8_model(root / f"{row}-{tag}", arch, seed=30 + i) for i, tag in enumerate("ab")]
    if kind == "online":  # the float checkpoints the FP8 ones were made from
        return tuple(ck.with_name(ck.name + "-float") for ck in made)
    return tuple(made)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a forward reads: parameters, buffers and plain tensor attributes of every module."""
    out = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                out.setdefault(f"{name}.{key}", value)
    return out


def differing(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    ours, theirs = state(a), state(b)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:5]
    return [n for n in ours if ours[n].shape != theirs[n].shape or not torch.equal(ours[n], theirs[n])]


def addresses(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def check_row(builder: SGLangBuilder, row: str, root: Path) -> dict:
    from sglang_ckpt_plugin.loader.checkpoint import read_checkpoint
    from sglang_ckpt_plugin.server.postprocessed import ModelLoad, layouts
    from sglang_ckpt_plugin.server.validate import UpdateRejected, check_update

    quantization = "fp8" if ROWS[row][1] == "online" else None
    a, b = checkpoints(root, row)
    served = builder.build(a, "dummy", quantization)
    record: dict = {"row": row, "architecture": type(served).__name__, "quantized_modules": len(layouts(served))}
    start = addresses(served)
    cpu = torch.device("cpu")
    for step, checkpoint in enumerate((a, b, a)):
        reference = builder.build(checkpoint, "auto", quantization)
        before = differing(served, reference)
        tensors = read_checkpoint(checkpoint)
        manifest = [(t.name, t.dtype, list(t.shape)) for t in tensors]
        checked = check_update(served, manifest, partial=False)
        load = ModelLoad(served, cpu, checked.coverage, checked.writes)
        _, errors, buckets = push_through_receiver(served, checkpoint, checked, load)
        record[f"push{step}"] = {
            "checkpoint": checkpoint.name,
            "buckets": buckets,
            "loader_errors": [str(e) for e in errors],
            "differed_before": len(before),
            "differing_after": differing(served, reference),
            "most_restored_at_once": load.most_restored,
        }
    record["addresses_kept"] = addresses(served) == start
    record["failed_loads"] = failed_loads(served, a)
    lacking = [m for m in manifest if not m[0].endswith("layers.1.self_attn.o_proj.weight")]
    q_only = [m for m in manifest if ".layers.0.self_attn.q_" in m[0]]
    for name, entries, partial in (("lacking", lacking, False), ("part_module", q_only, True)):
        try:
            check_update(served, entries, partial=partial)
            record[name] = "accepted"
        except UpdateRejected as exc:
            record[name] = f"refused ({exc.kind}): {exc}"
    return record


def failed_loads(served: torch.nn.Module, checkpoint: Path) -> dict[str, bool]:
    """What failures leave: a trainer session that writes part of a quantized module, and a load that raises after
    it began, each leave every quantized module as served (same objects, same bytes)."""
    from safetensors.torch import load_file

    from sglang_ckpt_plugin.server import postprocessed
    from sglang_ckpt_plugin.server.validate import check_update, loader_extents

    cpu = torch.device("cpu")
    tensors = {n: t for f in sorted(checkpoint.glob("*.safetensors")) for n, t in load_file(f).items()}
    # part of one quantized module: q of the fused qkv_proj, or (MLA) q_b_proj's weight without its scale
    q_only = [(n, t) for n, t in tensors.items() if ".layers.0.self_attn.q_proj." in n]
    module = "model.layers.0.self_attn.qkv_proj"
    if not q_only:
        q_only = [(n, t) for n, t in tensors.items() if n == "model.layers.0.self_attn.q_b_proj.weight"]
        module = "model.layers.0.self_attn.q_b_proj"
    before = {n: (p, p.detach().clone()) for n, p in served.named_parameters()}

    def unchanged() -> bool:
        now = dict(served.named_parameters())
        return all(now[n] is p and torch.equal(p, copy) for n, (p, copy) in before.items())

    out = {}
    postprocessed.open_session(served, cpu)
    manifest = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in q_only]
    coverage = check_update(served, manifest, partial=True, whole_modules=False).coverage
    postprocessed.load_restored(served, cpu, coverage, lambda: served.load_weights(q_only))
    session = postprocessed.session_of(served)
    session.end(loader_extents(served))
    postprocessed.close_session(served)
    out["session_named_the_part_module"] = list(session.partly) == [module]
    out["session_left_it_as_served"] = unchanged()

    def raising():
        served.load_weights(q_only)
        raise RuntimeError("the load failed after it began")

    try:
        postprocessed.load_restored(served, cpu, coverage, raising)
    except RuntimeError:
        pass
    out["failed_load_left_it_as_served"] = unchanged()
    return out


def main(out_path: str, root: str) -> None:
    builder, records = None, []
    for row in ROWS:
        try:
            builder = builder or SGLangBuilder(checkpoints(Path(root), row)[0])
            records.append(check_row(builder, row, Path(root)))
        except Exception:  # noqa: BLE001 - reported per row
            records.append({"row": row, "error": traceback.format_exc()[-3000:]})
        print(json.dumps(records[-1])[:400], flush=True)
    Path(out_path).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
