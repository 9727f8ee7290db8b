"""Check an update against the model before any parameter is touched, and measure what it would write.

The check is one dry run of the model's own ``load_weights`` over the whole update (dry_run.py): meta tensors
of the announced names, dtypes and shapes, every write recorded byte by byte (coverage.py), none executed. So what
an update covers is measured, not guessed from a list of layer types: the q/k/v rows of ``qkv_proj``, each
expert's w1 and w3 halves of a fused MoE ``w13_weight`` (only this rank's experts under expert parallelism:
SGLang's loader skips the others), padding rows a loader zero-fills, a pair the model fuses into one parameter.

The check finds:
- duplicate names in the update;
- names the model does not know (its ``load_weights`` raises KeyError, or silently drops a name that reaches no
  loader and no write), except tensors models skip on purpose (rotary caches; ``lm_head`` with tied embeddings;
  multi-token-prediction layers past ``num_hidden_layers``; with pipeline stages, what another stage holds),
  unless the caller allows unused tensors;
- shapes that do not fit (the loaders' own checks; whole-parameter shapes for parameters without a loader);
- what the update covers, byte by byte; a complete update must cover every byte of every parameter unless the
  caller asked for a partial one. A write the recorder cannot place (an in-place op other than copy/fill/zero,
  a view scattered over millions of runs) leaves that parameter unmeasured: a partial update touching it is
  refused, a complete one counts it written;
- which tensors the model only loads together (``together``): the receiver hands each such group to one
  ``load_weights`` call, whatever buckets its members travel in.

The dry run replaces ``weight_loader`` attributes on the live parameters for its duration, so it holds the
process's one-writer lock (writer.py), as every real load does.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import postprocessed
from . import sglang_compat as sg
from .coverage import Coverage, Extent, extent_of, missing_from, union_coverage, whole
from .dry_run import LoaderRaised, RecorderRefused, dry_run
from .writer import exclusive

logger = logging.getLogger("sglang_ckpt_plugin")

_SKIPPED_BY_MODELS = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

# A partial update with one half of a pair the model fuses looks unused: the model keeps it for its partner.
_PAIR_HINT = (
    " (a model that fuses tensors loaded together, e.g. DeepSeek's q_a_proj and kv_a_proj_with_mqa, uses "
    "neither unless both are in the same update)"
)

# Why an update was refused: "misfit" would fail or corrupt the load (a wrong shape, a name the model raises on);
# the others are the plugin's own promises (every tensor used, every byte written, every write measured).
RejectionKind = Literal["misfit", "unused", "uncovered", "unmeasured", "unrecordable", "part-module"]


class UpdateRejected(ValueError):
    """The update does not fit the model; nothing was written."""

    def __init__(self, message: str, kind: RejectionKind = "misfit"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class CheckedUpdate:
    coverage: Coverage  # parameter -> byte ranges the update writes
    together: tuple[frozenset[str], ...] = ()  # groups of tensors the model only loads in one call
    writes: dict[str, frozenset[str]] = field(default_factory=dict)  # update tensor -> the parameters it writes


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def loader_extents(model: torch.nn.Module) -> dict[str, Extent]:
    """Every parameter as its loader sees it (the layout before quantization post-processing, postprocessed.py)."""
    return {pname: extent_of(p.shape, p.element_size()) for pname, p in postprocessed.loader_facing(model).items()}


def required_coverage(model: torch.nn.Module) -> dict[str, Extent]:
    """Every parameter each of whose bytes must be written for it to hold real weights: all of them but those a
    checkpoint may leave out (a quantized attention's KV-cache scales)."""
    optional = sg.optional_parameters(model)
    return {pname: extent for pname, extent in loader_extents(model).items() if pname not in optional}


def skipped_on_purpose(name: str, config, own_lm_head: bool = True) -> bool:
    """Checkpoint tensors SGLang's models skip by design: rotary caches, ``lm_head`` of tied embeddings (or of a
    model that has no ``lm_head`` of its own: Gemma's always share the embeddings), and the multi-token-prediction
    (NextN) layers after the last decoder layer (served by a draft model, if any)."""
    if _SKIPPED_BY_MODELS.search(name):
        return True
    tied = bool(getattr(config, "tie_word_embeddings", False)) or not own_lm_head
    if tied and name.startswith("lm_head."):
        return True
    layer = _LAYER.match(name)
    nextn = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    return bool(layer and nextn and int(layer.group(1)) >= int(getattr(config, "num_hidden_layers", 1 << 30)))


def merge_together(groups: list[frozenset[str]]) -> tuple[frozenset[str], ...]:
    """Overlapping groups merged: a tensor fused with two others needs all three in one call."""
    merged: list[set[str]] = []
    for group in set(groups):
        overlapping = [m for m in merged if m & group]
        new = set(group).union(*overlapping)
        merged = [m for m in merged if not (m & group)] + [new]
    return tuple(sorted((frozenset(m) for m in merged), key=sorted))


def check_update(
    model: torch.nn.Module,
    manifest: list[tuple[str, str, list[int]]],
    partial: bool,
    allow_unused: bool = False,
    counted: Collection[str] | None = None,
    whole_modules: bool = True,
) -> CheckedUpdate:
    """What the update writes and how it must be loaded; raises UpdateRejected naming the first offending tensors.
    ``counted``: the parameters this check answers for (None: all; a draft model leaves out those it shares with
    its target, which the target's own check answers for). ``whole_modules``: a quantized module must be written
    whole (False inside a trainer session, whose end checks it)."""
    dupes = [name for name, count in Counter(name for name, _, _ in manifest).items() if count > 1]
    if dupes:
        raise UpdateRejected(f"duplicate tensor names in the update: {_first(dupes)}")
    all_extents, required = loader_extents(model), required_coverage(model)
    extents = required if counted is None else {p: e for p, e in required.items() if p in counted}
    try:
        with exclusive():
            run = dry_run(model, manifest)
    except RecorderRefused as exc:
        raise UpdateRejected(
            f"this model's parameters do not accept a recording weight_loader ({exc}), so the plugin cannot check "
            "an update before writing it; use /update_weights_from_disk for this model",
            "unrecordable",
        ) from None
    except LoaderRaised as raised:
        exc = raised.error
        if isinstance(exc, KeyError):
            raise UpdateRejected(f"tensor {raised.tensor!r} is not a weight of this model ({exc})") from None
        why = f"{type(exc).__name__}: {exc}"  # the model's own check, e.g. an assert on shapes
        raise UpdateRejected(f"tensor {raised.tensor!r} does not fit the model: {why}") from None
    coverage = {p: ranges for p, ranges in run.coverage(all_extents).items() if p in extents}

    if run.shape_errors:
        raise UpdateRejected(f"shape mismatch: {_first(run.shape_errors, 3)}")
    config = getattr(model, "config", None)
    own_lm_head = any(pname.startswith("lm_head.") for pname in extents)
    unused = [
        name
        for name, _, _ in manifest
        if name not in run.used
        and not skipped_on_purpose(name, config, own_lm_head)
        and not sg.held_by_another_stage(model, name)
    ]
    if unused and not allow_unused:
        raise UpdateRejected(
            f"{len(unused)} tensor(s) are not weights of this model (it would ignore them): {_first(unused)}; "
            "check the checkpoint matches the served model, or allow unused tensors explicitly"
            + (_PAIR_HINT if partial else ""),
            "unused",
        )
    unmeasured = {p: op for p, op in run.unmeasured.items() if p in extents}
    if unmeasured:
        what = _first(f"{p} ({op})" for p, op in unmeasured.items())
        if partial:
            raise UpdateRejected(
                f"the plugin cannot measure what this model's loaders write into {what}, so a partial update of "
                "them could leave part of them unwritten unnoticed; push them in a complete update",
                "unmeasured",
            )
        logger.warning("counting %s as written whole: its loader's writes cannot be measured", what)
        coverage.update({p: whole(extents[p]) for p in unmeasured})
    partly = postprocessed.partly_written(model, coverage, all_extents) if whole_modules else {}
    if partly:
        raise UpdateRejected(
            f"the update writes part of {len(partly)} quantized module(s): "
            f"{'; '.join(postprocessed.describe_partly(partly)[:3])}; a quantized module is "
            "post-processed (packed, requantized) as a whole once all of its weights are loaded, so an update must "
            "carry every tensor of it (e.g. q_proj, k_proj and v_proj of one layer together)",
            "part-module",
        )
    if not partial:
        missing = missing_from(extents, coverage)
        if missing:
            raise UpdateRejected(
                f"the update does not cover {len(missing)} parameter(s) of the model: {_first(missing)}; "
                "push the complete checkpoint (or ask for a partial update explicitly)",
                "uncovered",
            )
    writes = {name: frozenset(params) for name, params in run.writes.items()}
    return CheckedUpdate(coverage, merge_together(run.groups), writes)


def validate_update(
    model: torch.nn.Module,
    manifest: list[tuple[str, str, list[int]]],
    partial: bool,
    allow_unused: bool = False,
    whole_modules: bool = True,
) -> Coverage:
    """What the update writes (parameter -> byte ranges); raises UpdateRejected naming the first offending tensors."""
    return check_update(model, manifest, partial, allow_unused, whole_modules=whole_modules).coverage


def observe(model: torch.nn.Module, check: Callable[[list], None] | None = None, load_with=None):
    """A context manager that wraps ``model.load_weights`` for one SGLang-driven load (trainer, tensor and disk
    paths) and holds the one-writer lock for it: ``check(weights)`` runs before the real call (raise to refuse;
    nothing is written), then ``load_with(coverage, load)`` makes it (default: ``load()``); the returned record
    says whether the real ``load_weights`` was entered and with which tensors."""
    return _Observed(model, check, load_with)


class _Observed:
    def __init__(self, model: torch.nn.Module, check, load_with=None):
        self.model = model
        self.check = check
        self.load_with = load_with or (lambda coverage, load: load())
        self.touched = False  # the real load_weights was entered: weights may have changed
        self.manifest: list[tuple[str, str, list[int]]] = []
        self.coverage: Coverage = {}
        self._checking = False

    def __enter__(self) -> _Observed:
        exclusive().acquire()  # the swap below, and the load it observes, are the model's only writer
        real = self.model.load_weights
        self._own = self.model.__dict__.get("load_weights")  # an instance's own (trainer_names.py), put back after

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
            return self.load_with(checked, lambda: real(weights))

        self.model.load_weights = load_weights
        return self

    def __exit__(self, *exc) -> None:
        if self._own is None:
            self.model.__dict__.pop("load_weights", None)
        else:
            self.model.load_weights = self._own
        exclusive().release()
