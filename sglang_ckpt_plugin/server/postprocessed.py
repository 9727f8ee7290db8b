"""Exact updates of a model whose quantization post-processing changed what its loaders see.

SGLang runs each quantized module's ``process_weights_after_loading`` (PWAL) once its weights are loaded: FP8 on CPU
packs each weight (a VNNI permutation) and replaces the Parameter with a plain one (its ``weight_loader`` gone);
per-tensor and online FP8 transpose and requantize; DeepGEMM requantizes block scales to UE8M0 and marks them done.
Loading again into the post-processed module is wrong (an ``AttributeError``, or bytes written row-major into packed
storage, or a requantization skipped), and SGLang's own reload does just that.

Here, as in vLLM's layerwise reload: the loader-facing layout of every quantized module (each parameter's class,
shape, strides, dtype and attributes, its loaders among them; the module's plain flags) is recorded when SGLang
builds the model, before any PWAL. An update of such a module then

1. ``restore``: puts fresh parameters of the recorded layout in the module (the served ones set aside, untouched),
2. lets the model's own ``load_weights`` write them (every byte: a module is written whole or not at all),
3. ``finish``: runs that module's PWAL once, copies each result into the served tensor it replaces (same storage,
   same address: CUDA graphs keep reading it) and puts the served objects back. ``abandon`` instead puts them back
   unchanged (a failed load leaves a quantized module as it was).

The dry run (dry_run.py) and the gate count the recorded layout: what the loaders write, not what PWAL made of it.
Nothing here swaps a live module outside the one-writer lock and SGLang's model-update lock (the scheduler thread,
between batches); the dry run never swaps: it reads the recorded layout.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch

from . import sglang_compat as sg
from .coverage import missing_from, union_coverage

_SIMPLE = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ParamLayout:
    """One parameter as its loader sees it."""

    cls: type
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    attrs: dict  # its __dict__ (weight_loader, shard dimensions, ...), shallow

    @classmethod
    def of(cls, p: torch.nn.Parameter) -> ParamLayout:
        return cls(type(p), tuple(p.shape), tuple(p.stride()), p.dtype, dict(p.__dict__))

    def make(self, device: torch.device | str) -> torch.nn.Parameter:
        """A parameter of this layout (uninitialized), its attribute containers copied so a loader that records
        into them records into the new one."""
        data = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)
        p = torch.Tensor._make_subclass(self.cls, data, False)
        for key, value in self.attrs.items():
            p.__dict__[key] = copy.copy(value) if isinstance(value, (list, dict, set)) else value
        return p


@dataclass(frozen=True)
class ModuleLayout:
    params: dict[str, ParamLayout]
    flags: dict[str, object]  # the module's plain attributes before PWAL (PWAL sets some: they are reset)


_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {module name: ModuleLayout}


def record(model: torch.nn.Module) -> None:
    """Called as SGLang builds a model, before any weight is loaded or post-processed."""
    layouts = {}
    for name, module in sg.post_processed_modules(model):
        params = {key: ParamLayout.of(p) for key, p in module._parameters.items() if p is not None}
        flags = {key: value for key, value in vars(module).items() if isinstance(value, _SIMPLE)}
        layouts[name] = ModuleLayout(params, flags)
    _layouts[model] = layouts


def layouts(model: torch.nn.Module) -> dict[str, ModuleLayout]:
    """The recorded quantized modules of ``model`` (none where SGLang's flash_rl loader reloads it its own way)."""
    if sg.reloads_quantized_itself(model):
        return {}
    return _layouts.get(model, {})


def loader_facing(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter by its full name as the loaders see it: inside post-processed modules a data-less (meta)
    parameter of the recorded layout (what PWAL removed included, what it added left out), elsewhere the live one."""
    recorded = layouts(model)
    out = {}
    for pname, p in model.named_parameters():
        if pname.rpartition(".")[0] not in recorded:
            out[pname] = p
    for owner, layout in recorded.items():
        out.update({f"{owner}.{key}": param.make("meta") for key, param in layout.params.items()})
    return out


def modules_written(model: torch.nn.Module, coverage: dict) -> list[str]:
    """The post-processed modules an update with this coverage (parameter -> byte ranges) writes into."""
    recorded = layouts(model)
    return sorted({owner for pname in coverage if (owner := pname.rpartition(".")[0]) in recorded})


def partly_written(model: torch.nn.Module, coverage: dict, extents: dict) -> dict[str, list[str]]:
    """Each post-processed module the coverage writes only part of -> what of it it leaves unwritten. A module is
    post-processed as a whole, once every byte its loaders write is there, so it is written whole or not at all."""
    out = {}
    for owner in modules_written(model, coverage):
        names = {f"{owner}.{key}": extents[f"{owner}.{key}"] for key in layouts(model)[owner].params}
        left = missing_from(names, coverage)
        if left:
            out[owner] = left
    return out


def describe_partly(partly: dict[str, list[str]]) -> list[str]:
    return [
        f"{owner} (leaves {', '.join(left[:2])}{' ...' if len(left) > 2 else ''} unwritten)"
        for owner, left in partly.items()
    ]


@dataclass
class _SetAside:
    module: torch.nn.Module
    served: dict[str, torch.nn.Parameter | None]  # the module's parameters as served
    flags: dict[str, object]  # its plain attributes as served


class Restored:
    """Modules put in their loader-facing layout for one real load (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, names: list[str], device: torch.device):
        self.model = model
        self.device = device
        self.set_aside: dict[str, _SetAside] = {}
        self.add(names)

    def add(self, names: list[str]) -> None:
        """Restore more modules (those restored already are left as they are)."""
        if not names:
            return
        modules = dict(self.model.named_modules())
        for name in names:
            if name in self.set_aside:
                continue
            layout, module = layouts(self.model)[name], modules[name]
            self.set_aside[name] = _SetAside(
                module,
                dict(module._parameters),
                {key: value for key, value in vars(module).items() if isinstance(value, _SIMPLE)},
            )
            _set_flags(module, layout.flags)
            module._parameters = {key: p.make(self.device) for key, p in layout.params.items()}

    def finish(self, post_process: bool = True, only: list[str] | None = None) -> None:
        """PWAL each restored module (all, or ``only`` these; unless the caller's loader did), copy the results into
        the served tensors, put the served objects back. Raises RuntimeError if PWAL made a tensor the served one
        cannot hold (then the served objects are back, partly overwritten: the caller counts the update failed
        part-way)."""
        problems = []
        for name in list(self.set_aside) if only is None else only:
            aside = self.set_aside[name]
            module = aside.module
            if post_process:  # if it raises, the module stays set aside: abandon() puts the served objects back
                sg.post_process_module(module, self.device)
            del self.set_aside[name]
            fresh = dict(module._parameters)
            for key, served in aside.served.items():
                new = fresh.get(key)
                if served is None or new is None:
                    continue
                if new.shape != served.shape or new.dtype != served.dtype:
                    problems.append(
                        f"{name}.{key}: post-processing made {new.dtype} {list(new.shape)}, "
                        f"the served tensor is {served.dtype} {list(served.shape)}"
                    )
                    continue
                with torch.no_grad():
                    served.data.copy_(new.data)
                served.__dict__.update(new.__dict__)
            for key, value in fresh.items():  # what PWAL added that the served module lacked: keep it
                if key not in aside.served:
                    aside.served[key] = value
            module._parameters = aside.served
            # the flags as served (some set since the model was built, by others than PWAL), with PWAL's new values
            now = {key: value for key, value in vars(module).items() if isinstance(value, _SIMPLE)}
            _set_flags(module, {**aside.flags, **now})
        if problems:
            raise RuntimeError("cannot keep the served storage: " + "; ".join(problems[:3]))

    def abandon(self, names: list[str] | None = None) -> None:
        """Put the served objects back as they were (the fresh layout's bytes dropped): all, or ``names``."""
        for name in list(self.set_aside) if names is None else names:
            aside = self.set_aside.pop(name)
            aside.module._parameters = aside.served
            _set_flags(aside.module, aside.flags)


def _set_flags(module: torch.nn.Module, flags: dict) -> None:
    """The module's plain attributes become exactly ``flags`` (those set since are removed)."""
    for key in [k for k, v in vars(module).items() if isinstance(v, _SIMPLE) and k not in flags]:
        delattr(module, key)
    for key, value in flags.items():
        object.__setattr__(module, key, value)


class TrainerSession:
    """SGLang's trainer session (``begin_weight_update`` ... ``end_weight_update``) of one model: each call restores
    the modules it writes first (a bucket may carry part of a module, the next bucket the rest); at the end every
    restored module must be whole, and is post-processed once."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.restored = Restored(model, [], device)
        self.coverage: dict = {}
        self.partly: dict[str, list[str]] = {}  # set by end(): the modules it wrote in part, dropped

    def end(self, extents: dict) -> None:
        """Post-process what the session wrote whole; drop (as served) each module it wrote in part."""
        self.partly = partly_written(self.restored.model, self.coverage, extents)
        self.restored.abandon(list(self.partly))
        self.restored.finish()


_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its open TrainerSession


def open_session(model: torch.nn.Module, device: torch.device) -> None:
    if layouts(model):
        _sessions[model] = TrainerSession(model, device)


def session_of(model: torch.nn.Module) -> TrainerSession | None:
    return _sessions.get(model)


def close_session(model: torch.nn.Module) -> TrainerSession | None:
    return _sessions.pop(model, None)


def load_restored(model: torch.nn.Module, device: torch.device, coverage: dict, load):
    """One of SGLang's own load calls (trainer or tensor path) that writes ``coverage``: the post-processed modules it
    writes are restored first; outside a trainer session they are post-processed right after (SGLang's tensor and
    trainer calls never post-process), in one they wait for the session's end."""
    session = _sessions.get(model)
    restored = session.restored if session is not None else Restored(model, [], device)
    names = modules_written(model, coverage)
    fresh = [name for name in names if name not in restored.set_aside]
    restored.add(fresh)
    try:
        out = load()
    except BaseException:
        restored.abandon(fresh)
        raise
    if session is None:
        restored.finish()
    else:
        session.coverage = union_coverage(session.coverage, coverage)
    return out


class ModelLoad:
    """One real load of one model by the plugin, module by module as vLLM's layerwise reload does: ``prepare()``
    before the first write; ``load(names, call)`` around each bucket's ``load_weights`` call: the post-processed
    modules the bucket writes are restored first, and each module whose last tensor it carried is post-processed and
    copied into the served storage right after (so at most the modules in flight exist twice); ``post_process()``
    after the last bucket (SGLang's post-processing of the other modules, the model's fix-ups for a model without
    post-processed modules, and any restored module left); ``abandon()`` after a failure.

    ``coverage``: what the update writes into this model (its own parameter names); ``writes``: update tensor ->
    the parameters it writes, named ``prefix + own name``."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        coverage: dict,
        writes: dict[str, frozenset[str]] | None = None,
        prefix: str = "",
    ):
        self.model = model
        self.device = device
        # module -> the update tensors still to come that write it
        self.pending: dict[str, set[str]] = {name: set() for name in modules_written(model, coverage)}
        for tensor, params in (writes or {}).items():
            for pname in params:
                owner = pname[len(prefix) :].rpartition(".")[0] if pname.startswith(prefix) else None
                if owner in self.pending:
                    self.pending[owner].add(tensor)
        self.restored: Restored | None = None
        self.most_restored = 0  # the most modules held twice at once (served, and restored for this load)

    def prepare(self) -> None:
        sg.prepare_model_for_loading(self.model, self.device)
        # a module no tensor is known to write (the dry run could not attribute its writes) waits for the end
        self.restored = Restored(self.model, [name for name, left in self.pending.items() if not left], self.device)

    def load(self, names: list[str], call) -> None:
        arriving = set(names)
        self.restored.add([m for m, left in self.pending.items() if left & arriving])
        self.most_restored = max(self.most_restored, len(self.restored.set_aside))
        call()
        done = []
        for module, left in self.pending.items():
            if left & arriving:
                left -= arriving
                if not left:
                    done.append(module)
        if done:
            self.restored.finish(only=done)

    def post_process(self) -> None:
        recorded = layouts(self.model)
        if not recorded:  # no quantized module: SGLang's own post-processing, as for a disk load
            sg.post_process_model(self.model, self.device)
            return
        # The model's fix-ups ran inside each load_weights call, for the layers that call wrote, on the loader-facing
        # weights (as in SGLang's disk load); run again for every layer here, they would read modules this update
        # did not restore in their post-processed layout (packed bytes on CPU).
        modules = dict(self.model.named_modules())
        sg.post_process_unrecorded(self.model, self.device, {id(modules[name]) for name in recorded})
        self.restored.finish()

    def abandon(self) -> None:
        if self.restored is not None:
            self.restored.abandon()
