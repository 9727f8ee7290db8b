"""Check an update against the model before any parameter is touched, and measure what it would write.

A dry run of the model's own ``load_weights`` over *meta* tensors of the announced names, dtypes and shapes. Each
parameter's ``weight_loader`` (SGLang's loading convention) is pointed, for the dry run only, at the parameter's
real loader called with a meta *stand-in* of the parameter (same class, same attributes, no data). A thread-local
torch dispatch mode sees every write the loader makes into a stand-in and records the bytes it lands on (offset,
sizes, strides of the view: coverage.py). So what an update covers is measured, not guessed from a list of layer
types: the q/k/v rows of ``qkv_proj``, each expert's w1 and w3 halves of a fused MoE ``w13_weight`` (only this
rank's experts under expert parallelism: SGLang's loader skips the others), padding rows a loader zero-fills.
A write into the live model's own memory during the dry run is never executed (and refuses the update).

The dry run finds:
- duplicate names in the update;
- names the model does not know (its ``load_weights`` raises KeyError, or silently drops a name that reaches
  no parameter), except buffers models are known to skip (rotary caches; ``lm_head`` with tied embeddings),
  unless the caller allows unused tensors;
- shapes that do not fit (the loaders' own checks; whole-parameter shapes for parameters without a loader);
- what the update covers, byte by byte; a complete update must cover every byte of every parameter unless the
  caller asked for a partial one. A write the recorder cannot place (an in-place op other than copy/fill/zero,
  a view scattered over millions of runs) leaves that parameter unmeasured: a partial update touching it is
  refused, a complete one counts it written.

The stand-ins replace ``weight_loader`` attributes on the live parameters for the dry run's duration, so it holds
the process's one-writer lock (writer.py), as every real load does.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .coverage import Coverage, Extent, clip, extent_of, missing_from, union_coverage, view_runs, whole
from .writer import exclusive

logger = logging.getLogger("sglang_ckpt_plugin")

_MISSING = object()
_SKIPPED_BY_MODELS = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_aten = torch.ops.aten
_OVERWRITES = {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default}


class UpdateRejected(ValueError):
    """The update does not fit the model; nothing was written."""


class _LiveWrite(RuntimeError):
    """The dry run tried to write into the live model's memory (not through a stand-in)."""


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def required_coverage(model: torch.nn.Module) -> dict[str, Extent]:
    """Every parameter, each of whose bytes must be written for it to hold real weights."""
    return {pname: extent_of(p.shape, p.element_size()) for pname, p in model.named_parameters()}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _written(func, args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """The tensors an op writes into (its schema's mutable arguments: ``self`` of in-place ops, ``out=``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                out.append((arg.name, t))
    return out


class _Recorder(TorchDispatchMode):
    """Active on the dry run's thread only: records where writes into stand-ins land, blocks live writes."""

    def __init__(self, standins: dict[int, str], live: set[int]):
        super().__init__()
        self.standins = standins  # storage of a stand-in -> its parameter's name
        self.live = live  # data pointers of the live model's parameters and buffers
        self.runs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.unmeasured: dict[str, str] = {}  # parameter -> the op whose write could not be placed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        any_meta = any(t.device.type == "meta" for t in tensors)
        for name, t in _written(func, args, kwargs):
            if t.device.type == "meta":
                pname = self.standins.get(_storage_key(t))
                if pname is not None:
                    self._record(func, name, t, pname)
            elif t.untyped_storage().data_ptr() in self.live:
                raise _LiveWrite(f"{func} writes into the served model's memory")
            elif any_meta:  # a scratch tensor of the loader's, filled from a meta tensor: nothing to compute
                return t
        if any_meta and any(t.device.type != "meta" for t in tensors):  # e.g. a real buffer mixed with a weight
            args, kwargs = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, (args, kwargs))
        return func(*args, **kwargs)

    def _record(self, func, argname: str, view: torch.Tensor, pname: str) -> None:
        runs = None
        if func in _OVERWRITES or argname == "out":
            runs = view_runs(view.storage_offset(), view.shape, view.stride(), view.element_size())
        if runs is None:
            self.unmeasured.setdefault(pname, str(func))
        else:
            self.runs.setdefault(pname, []).append(runs)

    def coverage(self, extents: dict[str, Extent]) -> Coverage:
        out = {}
        for pname, runs in self.runs.items():
            starts = np.concatenate([s for s, _ in runs])
            ends = np.concatenate([e for _, e in runs])
            out[pname] = clip(starts, ends, extents[pname].nbytes)
        return out


def _standin(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A data-less twin of ``p``: its class (loaders dispatch on it) and attributes (containers copied, so a loader
    that records into them records into the twin's)."""
    twin = torch.Tensor._make_subclass(type(p), torch.empty(p.shape, dtype=p.dtype, device="meta"), False)
    for key, value in p.__dict__.items():
        twin.__dict__[key] = copy.copy(value) if isinstance(value, (list, dict, set)) else value
    return twin


def _loader_slot(p: torch.nn.Parameter) -> str:
    """Where ``p.weight_loader`` lives: SGLang's parameter classes expose it as a property over ``_weight_loader``."""
    return "_weight_loader" if isinstance(getattr(type(p), "weight_loader", None), property) else "weight_loader"


def _restore(params: dict, saved: dict) -> None:
    for pname, (slot, loader) in saved.items():
        if loader is _MISSING:
            params[pname].__dict__.pop(slot, None)
        else:
            params[pname].__dict__[slot] = loader


def validate_update(
    model: torch.nn.Module, manifest: list[tuple[str, str, list[int]]], partial: bool, allow_unused: bool = False
) -> Coverage:
    """What the update writes (parameter -> byte ranges); raises UpdateRejected naming the first offending tensors."""
    dupes = [name for name, count in Counter(name for name, _, _ in manifest).items() if count > 1]
    if dupes:
        raise UpdateRejected(f"duplicate tensor names in the update: {_first(dupes)}")
    extents = required_coverage(model)
    with exclusive():
        recorder, used, shape_errors = _dry_run(model, manifest)
    coverage = recorder.coverage(extents)

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
    if recorder.unmeasured:
        what = _first(f"{p} ({op})" for p, op in recorder.unmeasured.items())
        if partial:
            raise UpdateRejected(
                f"the plugin cannot measure what this model's loaders write into {what}, so a partial update of "
                "them could leave part of them unwritten unnoticed; push them in a complete update"
            )
        logger.warning("counting %s as written whole: its loader's writes cannot be measured", what)
        coverage.update({p: whole(extents[p]) for p in recorder.unmeasured})
    if not partial:
        missing = missing_from(extents, coverage)
        if missing:
            raise UpdateRejected(
                f"the update does not cover {len(missing)} parameter(s) of the model: {_first(missing)}; "
                "push the complete checkpoint (or ask for a partial update explicitly)"
            )
    return coverage


def _dry_run(model: torch.nn.Module, manifest) -> tuple[_Recorder, set[str], list[str]]:
    """Run ``load_weights`` for each manifest tensor against stand-ins (the caller holds the one-writer lock)."""
    params = dict(model.named_parameters())
    standins = {pname: _standin(p) for pname, p in params.items()}
    twin_of = {id(params[pname]): twin for pname, twin in standins.items()}
    live = {t.untyped_storage().data_ptr() for t in (*params.values(), *model.buffers()) if t.device.type != "meta"}
    recorder = _Recorder({_storage_key(t): pname for pname, t in standins.items()}, live - {0})
    used: set[str] = set()  # update tensors that reached some parameter's loader
    shape_errors: list[str] = []
    current = [""]  # the update tensor being dry-run, for messages

    def default_loader(pname: str):
        def load(param, loaded_weight, *args, **kwargs):  # SGLang's default_weight_loader, without .item()
            if tuple(loaded_weight.shape) != tuple(param.shape) and not (param.numel() == loaded_weight.numel() == 1):
                shape_errors.append(f"{current[0]!r} has shape {list(loaded_weight.shape)}, "
                                    f"parameter {pname!r} has {list(param.shape)}")  # fmt: skip
                return
            param.data.fill_(0) if param.numel() == 1 else param.data.copy_(loaded_weight)

        return load

    def redirect(pname: str, original):
        def load(param, loaded_weight, *args, **kwargs):
            used.add(current[0])
            return original(twin_of.get(id(param), standins[pname]), loaded_weight, *args, **kwargs)

        return load

    saved = {}
    try:
        for pname, p in params.items():
            slot = _loader_slot(p)
            original = getattr(p, "weight_loader", None)
            if getattr(original, "__self__", None) is p:  # a method of the parameter itself: call the twin's
                original = getattr(standins[pname], "weight_loader")
            saved[pname] = (slot, p.__dict__.get(slot, _MISSING))
            setattr(p, slot, redirect(pname, original or default_loader(pname)))
    except (AttributeError, TypeError) as exc:
        _restore(params, saved)
        raise UpdateRejected(
            f"this model's parameters do not accept a recording weight_loader ({exc}), so the plugin cannot check "
            "an update before writing it; use /update_weights_from_disk for this model"
        ) from None

    try:
        with recorder:
            for name, dtype, shape in manifest:
                current[0] = name
                meta = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                try:
                    model.load_weights([(name, meta)])
                except KeyError as exc:
                    raise UpdateRejected(f"tensor {name!r} is not a weight of this model ({exc})") from None
                except _LiveWrite as exc:
                    raise UpdateRejected(
                        f"loading tensor {name!r} writes into the model's memory outside its weight_loader ({exc}), so "
                        "the plugin cannot check an update before writing it; use /update_weights_from_disk"
                    ) from None
                except Exception as exc:  # the model's own check, e.g. an assert on shapes
                    why = f"{type(exc).__name__}: {exc}"
                    raise UpdateRejected(f"tensor {name!r} does not fit the model: {why}") from None
    finally:
        _restore(params, saved)
    return recorder, used, shape_errors


def observe(model: torch.nn.Module, check: Callable[[list], None] | None = None):
    """A context manager that wraps ``model.load_weights`` for one SGLang-driven load (trainer, tensor and disk
    paths) and holds the one-writer lock for it: ``check(weights)`` runs before the real call (raise to refuse;
    nothing is written), and the returned record says whether the real ``load_weights`` was entered and with
    which tensors."""
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
        exclusive().acquire()  # the swap below, and the load it observes, are the model's only writer
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
            self.coverage = union_coverage(self.coverage, checked)
            self.manifest.extend(entries)
            self.touched = True
            return real(weights)

        self.model.load_weights = load_weights
        return self

    def __exit__(self, *exc) -> None:
        self.model.__dict__.pop("load_weights", None)
        exclusive().release()
