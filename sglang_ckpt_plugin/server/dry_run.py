"""One dry run of the model's own ``load_weights`` over the whole update, on *meta* tensors: what it would write.

The model's ``load_weights`` is called once with every tensor of the update (names, dtypes, shapes as announced;
no data), as SGLang's disk loader calls it with a whole checkpoint. So a loader that keeps one tensor until its
partner arrives (DeepSeek-V2/V3's ``q_a_proj`` + ``kv_a_proj_with_mqa`` fused into ``fused_qkv_a_proj_with_mqa``)
fuses them here as it does there, in whichever order they come.

Each parameter's ``weight_loader`` is pointed, for the dry run only, at the real loader called with a meta
*stand-in* of the parameter (same class, same attributes, no data); a loader bound to a module (Gemma's norms:
``self.weight`` of a ``GemmaRMSNorm``) is called on a shallow copy of that module whose parameters are the
stand-ins. A thread-local torch dispatch mode sees every op:

- every write into a stand-in, or into a live parameter's memory (a loader that writes ``param.data`` itself),
  is recorded as the bytes it lands on (offset, sizes, strides of the view: coverage.py); writes into the live
  model's memory are never executed, nor writes into its other tensors (Gemma's ``gemma_weight``, derived
  caches): those are the real load's business;
- every tensor carries the names of the update tensors it was computed from (its *sources*), so a write made of
  two update tensors (a ``torch.cat`` of a pair) names both: both are used, and they must reach ``load_weights``
  in one call (``together``), wherever bucket boundaries fall.

The model's own post-load fix-ups (``post_load_weights``: DeepSeek's ``w_kc``/``w_vc`` from ``kv_b_proj``) are
left out of the dry run: they derive state from the served weights, and the real load runs them.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from . import postprocessed
from . import sglang_compat as sg
from .coverage import Coverage, Extent, clip, view_runs

_MISSING = object()
_aten = torch.ops.aten
_OVERWRITES = {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default}


class RecorderRefused(TypeError):
    """The model's parameters do not accept a recording ``weight_loader``."""


class LoaderRaised(Exception):
    """The model's load raised while it was handed ``tensor`` (the update tensor last given to it)."""

    def __init__(self, tensor: str, error: BaseException):
        super().__init__(tensor, error)
        self.tensor = tensor
        self.error = error


@dataclass
class DryRun:
    """What the model's load would do with the whole update."""

    used: set[str] = field(default_factory=set)  # update tensors that reached a loader or a write
    groups: list[frozenset[str]] = field(default_factory=list)  # tensors some write was computed from together
    shape_errors: list[str] = field(default_factory=list)
    runs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    unmeasured: dict[str, str] = field(default_factory=dict)  # parameter -> the op whose write cannot be placed
    writes: dict[str, set[str]] = field(default_factory=dict)  # update tensor -> the parameters it writes

    def coverage(self, extents: dict[str, Extent]) -> Coverage:
        out = {}
        for pname, runs in self.runs.items():
            if pname not in extents:  # a tensor quantization post-processing added, not one the loaders write
                continue
            starts = np.concatenate([s for s, _ in runs])
            ends = np.concatenate([e for _, e in runs])
            out[pname] = clip(starts, ends, extents[pname].nbytes)
        return out

    def record(self, func, argname: str, view: torch.Tensor, pname: str, byte_offset: int = 0) -> None:
        runs = None
        if func in _OVERWRITES or argname == "out":
            runs = view_runs(view.storage_offset(), view.shape, view.stride(), view.element_size())
        if runs is None:
            self.unmeasured.setdefault(pname, str(func))
        else:
            self.runs.setdefault(pname, []).append((runs[0] - byte_offset, runs[1] - byte_offset))

    def wrote(self, pname: str, sources: frozenset[str]) -> None:
        for source in sources:
            self.writes.setdefault(source, set()).add(pname)

    def consumed(self, sources: frozenset[str]) -> None:
        self.used |= sources
        if len(sources) > 1:
            self.groups.append(sources)


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
    """Active on the dry run's thread only: records writes, follows sources, executes no write into the model."""

    def __init__(self, result: DryRun, standins: dict[int, str], live_params: dict[int, list], live: set[int]):
        super().__init__()
        self.result = result
        self.standins = standins  # storage of a stand-in -> its parameter's name
        self.live_params = live_params  # data pointer of a live parameter's storage -> [(name, byte offset)]
        self.live = live  # data pointers of the live model's other tensors (buffers, derived caches)
        self.sources: dict[int, frozenset[str]] = {}  # storage -> update tensors its contents came from
        self._alive: list[torch.Tensor] = []  # keeps storages with sources alive: a freed key could be reused

    def mark(self, t: torch.Tensor, sources: frozenset[str]) -> None:
        if sources:
            key = _storage_key(t)
            self.sources[key] = self.sources.get(key, frozenset()) | sources
            self._alive.append(t)

    def sources_of(self, tensors) -> frozenset[str]:
        found = frozenset()
        for t in tensors:
            found |= self.sources.get(_storage_key(t), frozenset())
        return found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        written = _written(func, args, kwargs)
        targets = {id(t) for _, t in written}
        sources = self.sources_of(t for t in tensors if id(t) not in targets)
        any_meta = any(t.device.type == "meta" for t in tensors)
        skip = None
        for argname, t in written:
            if t.device.type == "meta":
                pname = self.standins.get(_storage_key(t))
                if pname is not None:
                    self.result.record(func, argname, t, pname)
                    self.result.wrote(pname, sources)
                    self.result.consumed(sources)
                self.mark(t, sources)
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.live_params:  # a loader writing the live parameter itself: count it, never do it
                for pname, byte_offset in self.live_params[ptr]:
                    self.result.record(func, argname, t, pname, byte_offset)
                    self.result.wrote(pname, sources)
                self.result.consumed(sources)
                skip = t
            elif ptr in self.live or any_meta:  # the model's derived state, or a scratch tensor filled from meta
                self.mark(t, sources)
                skip = t
        if skip is not None:
            return skip
        if any_meta and any(t.device.type != "meta" for t in tensors):  # e.g. a real buffer mixed with a weight
            args, kwargs = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, (args, kwargs))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.mark(t, sources)
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


def _rebound(original, twin_of: dict[int, torch.nn.Parameter]):
    """The loader to call in the dry run: a method of the parameter itself is the twin's; a method of a module
    (it writes ``self.<param>``) is bound to a copy of that module whose parameters are the stand-ins."""
    owner = getattr(original, "__self__", None)
    if owner is None or not isinstance(original, types.MethodType):
        return original
    if isinstance(owner, torch.nn.Parameter):
        twin = twin_of.get(id(owner))
        return getattr(twin, original.__name__) if twin is not None else original
    if isinstance(owner, torch.nn.Module):
        shadow = copy.copy(owner)
        shadow._parameters = {k: twin_of.get(id(v), v) for k, v in owner._parameters.items()}
        return types.MethodType(original.__func__, shadow)
    return original


def _live_tensors(model: torch.nn.Module, params: dict) -> tuple[dict[int, list], set[int]]:
    """Data pointers of the live parameters (with each one's byte offset into its storage) and of every other
    tensor the model's modules hold (buffers and plain tensor attributes such as derived weight caches)."""
    live_params: dict[int, list] = {}
    for pname, p in params.items():
        if p.device.type != "meta" and p.numel():
            ptr = p.untyped_storage().data_ptr()
            live_params.setdefault(ptr, []).append((pname, p.storage_offset() * p.element_size()))
    others = set()
    for module in model.modules():
        for value in (*module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and value.numel():
                others.add(value.untyped_storage().data_ptr())
    return live_params, others - set(live_params) - {0}


def dry_run(model: torch.nn.Module, manifest) -> DryRun:
    """Run ``load_weights`` once over the whole manifest against stand-ins (the caller holds the one-writer lock).
    Raises RecorderRefused, or LoaderRaised with what the model's loaders raised."""
    params = dict(model.named_parameters())
    # stand-ins of the parameters as the loaders see them: the recorded layout of a post-processed module
    standins = {pname: _standin(p) for pname, p in postprocessed.loader_facing(model).items()}
    twin_of = {id(params[pname]): twin for pname, twin in standins.items() if pname in params}
    result = DryRun()
    live_params, live = _live_tensors(model, params)
    recorder = _Recorder(result, {_storage_key(t): pname for pname, t in standins.items()}, live_params, live)
    current = [""]  # the update tensor being handed to load_weights, for messages

    def default_loader(pname: str):
        def load(param, loaded_weight, *args, **kwargs):  # SGLang's default_weight_loader, without .item()
            if tuple(loaded_weight.shape) != tuple(param.shape) and not (param.numel() == loaded_weight.numel() == 1):
                result.shape_errors.append(
                    f"{current[0]!r} has shape {list(loaded_weight.shape)}, parameter {pname!r} has {list(param.shape)}"
                )
                return
            param.data.fill_(0) if param.numel() == 1 else param.data.copy_(loaded_weight)

        return load

    def redirect(pname: str, original):
        def load(param, loaded_weight, *args, **kwargs):
            sources = recorder.sources_of([loaded_weight]) if isinstance(loaded_weight, torch.Tensor) else None
            result.consumed(sources or frozenset([current[0]]))
            return original(twin_of.get(id(param), standins[pname]), loaded_weight, *args, **kwargs)

        return load

    saved = {}
    try:
        for pname, p in params.items():
            if pname not in standins:  # a tensor post-processing added: no loader writes it
                continue
            slot = _loader_slot(p)
            original = _rebound(getattr(standins[pname], "weight_loader", None), twin_of)
            saved[pname] = (slot, p.__dict__.get(slot, _MISSING))
            setattr(p, slot, redirect(pname, original or default_loader(pname)))
    except (AttributeError, TypeError) as exc:
        _restore(params, saved)
        raise RecorderRefused(str(exc)) from None

    def update():
        for name, dtype, shape in manifest:
            current[0] = name
            meta = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            recorder.mark(meta, frozenset([name]))
            yield name, meta

    try:
        with sg.without_post_load_fixups(model), recorder:
            model.load_weights(update())
    except Exception as exc:
        raise LoaderRaised(current[0], exc) from exc
    finally:
        _restore(params, saved)
    return result


def _restore(params: dict, saved: dict) -> None:
    for pname, (slot, loader) in saved.items():
        if loader is _MISSING:
            params[pname].__dict__.pop(slot, None)
        else:
            params[pname].__dict__[slot] = loader
