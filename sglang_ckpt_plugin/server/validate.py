"""Check a whole update against the model before any parameter is touched.

A dry run of the model's own ``load_weights`` over *meta* tensors of the announced names, dtypes and shapes,
with every parameter's ``weight_loader`` (SGLang's loading convention) replaced by a recorder. Meta tensors
carry no data, so nothing can be written even by a loader that bypasses ``weight_loader`` (copying from a meta
tensor raises). The dry run finds:
- duplicate names in the update;
- names the model does not know (its ``load_weights`` raises KeyError, or silently drops a name that reaches
  no parameter), except buffers models are known to skip (rotary caches; ``lm_head`` with tied embeddings),
  unless the caller allows unused tensors;
- shape mismatches for parameters loaded whole (no TP-specific loader);
- parameters no tensor reached (missing), unless the caller asked for a partial update. Coverage is per
  parameter: one missing part of a stacked parameter (say v_proj of qkv_proj) is not detected.
Models whose parameters do not accept a recorder (some quantized parameter classes) are not dry-run; their
errors surface during the update instead (which then counts as failed part-way).
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import torch

logger = logging.getLogger("sglang_ckpt_plugin")

_MISSING = object()
_SKIPPED_BY_MODELS = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


class UpdateRejected(ValueError):
    """The update does not fit the model; nothing was written."""


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def validate_update(
    model: torch.nn.Module, manifest: list[tuple[str, str, list[int]]], partial: bool, allow_unused: bool = False
) -> None:
    """Raise UpdateRejected naming the first offending tensors; return None if the update fits."""
    dupes = [name for name, count in Counter(name for name, _, _ in manifest).items() if count > 1]
    if dupes:
        raise UpdateRejected(f"duplicate tensor names in the update: {_first(dupes)}")

    params = dict(model.named_parameters())
    reached: set[str] = set()
    used: set[str] = set()  # update tensors that reached some parameter
    shape_errors: list[str] = []
    current: list[str] = [""]  # the update tensor being dry-run, for messages
    saved = {}

    def recorder_for(pname: str, param: torch.nn.Parameter, has_custom_loader: bool):
        def record(p, loaded_weight, *args, **kwargs):
            reached.add(pname)
            used.add(current[0])
            if not has_custom_loader and tuple(loaded_weight.shape) != tuple(param.shape):
                shape_errors.append(f"{current[0]!r} has shape {list(loaded_weight.shape)}, "
                                    f"parameter {pname!r} has {list(param.shape)}")  # fmt: skip

        return record

    try:
        for pname, p in params.items():
            saved[pname] = p.__dict__.get("weight_loader", _MISSING)
            p.weight_loader = recorder_for(pname, p, saved[pname] is not _MISSING)
    except (AttributeError, TypeError):
        _restore(params, saved)
        logger.warning("model parameters do not accept a recording loader; skipping the pre-update dry run")
        return

    try:
        for name, dtype, shape in manifest:
            current[0] = name
            meta = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            try:
                model.load_weights([(name, meta)])
            except KeyError as exc:
                raise UpdateRejected(f"tensor {name!r} is not a weight of this model ({exc})") from None
            except Exception as exc:  # the model's own check, e.g. an assert on shapes
                raise UpdateRejected(f"tensor {name!r} does not fit the model: {type(exc).__name__}: {exc}") from None
    finally:
        _restore(params, saved)

    if shape_errors:
        raise UpdateRejected(f"shape mismatch: {_first(shape_errors, 3)}")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    unused = [name for name, _, _ in manifest if name not in used and not _SKIPPED_BY_MODELS.search(name)
              and not (tied and name.startswith("lm_head."))]  # fmt: skip
    if unused and not allow_unused:
        raise UpdateRejected(
            f"{len(unused)} tensor(s) are not weights of this model (it would ignore them): {_first(unused)}; "
            "check the checkpoint matches the served model, or allow unused tensors explicitly"
        )
    if not partial:
        missing = [p for p in params if p not in reached]
        if missing:
            raise UpdateRejected(
                f"the update does not cover {len(missing)} parameter(s) of the model: {_first(missing)}; "
                "push the complete checkpoint (or ask for a partial update explicitly)"
            )


def _restore(params: dict, saved: dict) -> None:
    for pname, loader in saved.items():
        if loader is _MISSING:
            params[pname].__dict__.pop("weight_loader", None)
        else:
            params[pname].weight_loader = loader
