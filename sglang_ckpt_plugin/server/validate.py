"""Check an update against the model before any parameter is touched, and say what it would write.

A dry run of the model's own ``load_weights`` over *meta* tensors of the announced names, dtypes and shapes,
with every parameter's ``weight_loader`` (SGLang's loading convention) replaced by a recorder. Meta tensors
carry no data, so nothing can be written even by a loader that bypasses ``weight_loader`` (copying from a meta
tensor raises). The dry run finds:
- duplicate names in the update;
- names the model does not know (its ``load_weights`` raises KeyError, or silently drops a name that reaches
  no parameter), except buffers models are known to skip (rotary caches; ``lm_head`` with tied embeddings),
  unless the caller allows unused tensors;
- shape mismatches for parameters loaded whole (no TP-specific loader);
- what the update covers: per parameter, and per stacked shard of fused parameters (q/k/v of ``qkv_proj``,
  the halves of ``gate_up_proj``), so a missing ``v_proj`` is missing even though ``qkv_proj`` was reached.
  A complete update must cover every shard of every parameter unless the caller asked for a partial one.
Models whose parameters do not accept a recorder (some quantized parameter classes) cannot be dry-run: their
updates are refused, because what they would write (and so whether the weights are complete) is unknown.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import torch

from .weights_state import WHOLE, Coverage, missing_from

_MISSING = object()
_SKIPPED_BY_MODELS = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


class UpdateRejected(ValueError):
    """The update does not fit the model; nothing was written."""


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def stacked_shards(module: torch.nn.Module) -> tuple[str, ...] | None:
    """The shard ids a fused linear layer is loaded by (SGLang's QKVParallelLinear and
    MergedColumnParallelLinear, told apart by the attributes they define), or None for a whole parameter."""
    sizes = getattr(module, "output_sizes", None)
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        return None
    if hasattr(module, "q_proj_shard_size"):  # QKVParallelLinear: loaded with "q", "k", "v"
        return ("q", "k", "v")
    return tuple(str(i) for i in range(len(sizes)))


def required_coverage(model: torch.nn.Module) -> dict[str, frozenset[str]]:
    """Every parameter and the shards that must all be written for it to hold real weights."""
    modules = dict(model.named_modules())
    required = {}
    for pname, _ in model.named_parameters():
        owner = modules.get(pname.rpartition(".")[0])
        shards = stacked_shards(owner) if owner is not None else None
        required[pname] = frozenset(shards) if shards else frozenset({WHOLE})
    return required


def _shard_keys(args, kwargs) -> set[str]:
    """What one ``weight_loader(param, weight, shard_id)`` call writes: a shard id, several, or the whole."""
    shard = args[0] if args else kwargs.get("loaded_shard_id", kwargs.get("shard_id"))
    if shard is None:
        return {WHOLE}
    if isinstance(shard, (tuple, list)):
        return {str(s) for s in shard}
    return {str(shard)}


def validate_update(
    model: torch.nn.Module, manifest: list[tuple[str, str, list[int]]], partial: bool, allow_unused: bool = False
) -> Coverage:
    """What the update writes (parameter -> shard keys); raises UpdateRejected naming the first offending tensors."""
    dupes = [name for name, count in Counter(name for name, _, _ in manifest).items() if count > 1]
    if dupes:
        raise UpdateRejected(f"duplicate tensor names in the update: {_first(dupes)}")

    params = dict(model.named_parameters())
    reached: dict[str, set[str]] = {}
    used: set[str] = set()  # update tensors that reached some parameter
    shape_errors: list[str] = []
    current: list[str] = [""]  # the update tensor being dry-run, for messages
    saved = {}

    def recorder_for(pname: str, param: torch.nn.Parameter, has_custom_loader: bool):
        def record(p, loaded_weight, *args, **kwargs):
            reached.setdefault(pname, set()).update(_shard_keys(args, kwargs))
            used.add(current[0])
            if not has_custom_loader and tuple(loaded_weight.shape) != tuple(param.shape):
                shape_errors.append(f"{current[0]!r} has shape {list(loaded_weight.shape)}, "
                                    f"parameter {pname!r} has {list(param.shape)}")  # fmt: skip

        return record

    try:
        for pname, p in params.items():
            saved[pname] = p.__dict__.get("weight_loader", _MISSING)
            p.weight_loader = recorder_for(pname, p, saved[pname] is not _MISSING)
    except (AttributeError, TypeError) as exc:
        _restore(params, saved)
        raise UpdateRejected(
            f"this model's parameters do not accept a recording weight_loader ({exc}), so the plugin cannot check "
            "an update before writing it; use /update_weights_from_disk for this model"
        ) from None

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
    coverage = {p: frozenset(keys) for p, keys in reached.items()}
    if not partial:
        missing = missing_from(required_coverage(model), coverage)
        if missing:
            raise UpdateRejected(
                f"the update does not cover {len(missing)} parameter(s) of the model: {_first(missing)}; "
                "push the complete checkpoint (or ask for a partial update explicitly)"
            )
    return coverage


def observe(model: torch.nn.Module, check: Callable[[list], None] | None = None):
    """A context manager that wraps ``model.load_weights`` for one SGLang-driven load (trainer, tensor and disk
    paths): ``check(weights)`` runs before the real call (raise to refuse; nothing is written), and the
    returned record says whether the real ``load_weights`` was entered and with which tensors."""
    return _Observed(model, check)


class _Observed:
    def __init__(self, model: torch.nn.Module, check):
        self.model = model
        self.check = check
        self.touched = False  # the real load_weights was entered: weights may have changed
        self.manifest: list[tuple[str, str, list[int]]] = []
        self.coverage: Coverage = {}
        self._checking = False

    def __enter__(self) -> "_Observed":
        real = self.model.load_weights

        def load_weights(weights):
            if self._checking:  # the check's own dry run (meta tensors) calls load_weights
                return real(weights)
            if self.check is None:  # disk path: a lazy iterator; pass it through untouched
                self.touched = True
                return real(weights)
            weights = list(weights)
            entries = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in weights]
            self._checking = True
            try:
                checked = self.check(entries) or {}
            finally:
                self._checking = False
            for pname, keys in checked.items():
                self.coverage[pname] = self.coverage.get(pname, frozenset()) | keys
            self.manifest.extend(entries)
            self.touched = True
            return real(weights)

        self.model.load_weights = load_weights
        return self

    def __exit__(self, *exc) -> None:
        self.model.__dict__.pop("load_weights", None)


def _restore(params: dict, saved: dict) -> None:
    for pname, loader in saved.items():
        if loader is _MISSING:
            params[pname].__dict__.pop("weight_loader", None)
        else:
            params[pname].weight_loader = loader
