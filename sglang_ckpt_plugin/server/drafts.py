"""The models one scheduler process writes: the target and its speculative-decoding draft models.

Every draft is written by the same update as the target, from the same buckets, in the same critical section
(the commit, with two phases), so that target and draft change together:

- a draft that reads the target's own checkpoint (DeepSeek-V3's MTP/NextN layers, Qwen3-Next, GLM-4.5, or any
  draft whose ``--speculative-draft-model-path`` is the target's) is handed the target's tensors after the target,
  and keeps what it holds (a NextN draft: layer N). Its own parameters count for the gate as ``draft.<name>``
  (SGLang's ``/weights_checker`` names them so), and a complete update must write them;
- a draft with a checkpoint of its own (EAGLE/EAGLE3/STANDALONE elsewhere) is handed the update's ``draft.<name>``
  tensors (the loader's ``--draft-checkpoint-path``), the prefix stripped. A complete update must carry them, so a
  target never changes without its draft. SGLang's own disk reload and trainer paths hand such a draft the target's
  tensors, which the plugin does not measure: the gate counts the target alone for it.

A draft shares the target's embeddings and ``lm_head`` where SGLang makes it so (``set_embed_and_head``): those are
the target's, written and counted with it. The set is decided once per process (``ModelSet``), from SGLang's
scheduler, and every update path reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transport.messages import DRAFT_PREFIX
from .coverage import Coverage, Extent, extent_of, whole
from .validate import CheckedUpdate, UpdateRejected, check_update, merge_together, required_coverage

Manifest = list[tuple[str, str, list[int]]]


@dataclass(frozen=True)
class Draft:
    prefix: str  # its parameters' names in the weights state, and its own tensors' names in an update
    model: torch.nn.Module
    checkpoint: str  # the checkpoint it loads at start (a resolved path)
    reads_target_checkpoint: bool


@dataclass(frozen=True)
class ModelSet:
    target: torch.nn.Module
    drafts: tuple[Draft, ...] = ()

    @property
    def counted_drafts(self) -> tuple[Draft, ...]:
        """The drafts the gate waits for and SGLang's own update paths are measured on: those that read the
        target's checkpoint."""
        return tuple(d for d in self.drafts if d.reads_target_checkpoint)

    def required(self) -> dict[str, Extent]:
        """Every parameter the gate waits for: the target's, then each counted draft's own under its prefix."""
        extents = required_coverage(self.target)
        for draft in self.counted_drafts:
            extents.update(prefixed(draft.prefix, self.own_parameters(draft.model)))
        return extents

    def own_parameters(self, model: torch.nn.Module) -> dict[str, Extent]:
        """A member's parameters, less those it shares with the target (an EAGLE/NextN draft serves with the
        target's embeddings and lm_head, written when the target's are)."""
        if model is self.target:
            return required_coverage(model)
        target = {id(p) for p in self.target.parameters()} | {_storage(p) for p in self.target.parameters()}
        return {
            name: extent_of(p.shape, p.element_size())
            for name, p in model.named_parameters()
            if id(p) not in target and _storage(p) not in target
        }

    def everything_of(self, model: torch.nn.Module) -> Coverage:
        """Every parameter a member holds of its own, named as in ``required``."""
        own = prefixed(self.prefix_of(model), self.own_parameters(model))
        return {name: whole(extent) for name, extent in own.items()}

    def prefix_of(self, model: torch.nn.Module) -> str:
        return next((d.prefix for d in self.drafts if d.model is model), "")

    # ------------------------------------------------------------------ one update
    def _own_checkpoint_drafts(self) -> tuple[Draft, ...]:
        return tuple(d for d in self.drafts if not d.reads_target_checkpoint)

    def targets_name(self, name: str) -> bool:
        """A tensor of the target's checkpoint (not one of a draft's own, which carry its prefix)."""
        return not any(name.startswith(d.prefix) for d in self._own_checkpoint_drafts())

    def part_for(self, draft: Draft, names: list[str]) -> list[tuple[str, str]]:
        """(name in the update, name the draft's loader knows) of the tensors ``draft`` is handed."""
        if draft.reads_target_checkpoint:
            return [(name, name) for name in names if self.targets_name(name)]
        return [(name, name[len(draft.prefix) :]) for name in names if name.startswith(draft.prefix)]

    def check(self, manifest: Manifest, partial: bool, allow_unused: bool) -> CheckedUpdate:
        """What the update writes into the target and each draft; raises UpdateRejected in words where one of
        them cannot take it, where a complete update leaves a draft behind, or where it carries a draft's own
        tensors this server has no draft for."""
        names = [name for name, _, _ in manifest]
        if not self._own_checkpoint_drafts() and any(name.startswith(DRAFT_PREFIX) for name in names):
            raise UpdateRejected(
                "the update carries a draft model's own checkpoint (--draft-checkpoint-path: draft.* tensors), but "
                "this server serves no draft model with a checkpoint of its own; drop --draft-checkpoint-path"
            )
        parts = {draft.prefix: self.part_for(draft, names) for draft in self.drafts}
        for draft in self._own_checkpoint_drafts():
            if not parts[draft.prefix] and not partial:  # a partial update may leave the draft as it is, on purpose
                raise UpdateRejected(
                    f"this server's speculative-decoding draft model loads a checkpoint of its own "
                    f"({draft.checkpoint}), and the update does not carry it: push it with the target "
                    "(--draft-checkpoint-path DIR) so that both change together, or ask for a partial update"
                )
        entries = {name: (name, dtype, shape) for name, dtype, shape in manifest}
        checked = check_update(self.target, [entries[n] for n in names if self.targets_name(n)], partial, allow_unused)
        coverage, groups = dict(checked.coverage), list(checked.together)
        writes = {name: set(params) for name, params in checked.writes.items()}
        for draft in self.drafts:
            part = parts[draft.prefix]
            if not part and not draft.reads_target_checkpoint:
                continue
            renamed = [(own_name, *entries[name][1:]) for name, own_name in part]
            lenient = allow_unused or draft.reads_target_checkpoint  # it ignores most of the target's tensors
            try:
                drafted = check_update(draft.model, renamed, partial, lenient, self.own_parameters(draft.model))
            except UpdateRejected as exc:
                raise UpdateRejected(f"the draft model ({draft.prefix}*): {exc}", exc.kind) from None
            coverage.update(prefixed(draft.prefix, drafted.coverage))
            to_update = {own_name: name for name, own_name in part}
            groups += [frozenset(to_update[n] for n in group) for group in drafted.together]
            for own_name, params in drafted.writes.items():
                writes.setdefault(to_update.get(own_name, own_name), set()).update(draft.prefix + p for p in params)
        return CheckedUpdate(coverage, merge_together(groups), {n: frozenset(ps) for n, ps in writes.items()})

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket: the target's tensors into the target, then each draft's into that draft."""
        tensors = dict(weights)
        names = list(tensors)
        mine = [(name, tensors[name]) for name in names if self.targets_name(name)]
        if mine:
            self.target.load_weights(mine)
        for draft in self.drafts:
            part = [(own_name, tensors[name]) for name, own_name in self.part_for(draft, names)]
            if part:
                draft.model.load_weights(part)

    def own_coverage(self, model: torch.nn.Module, coverage: Coverage) -> Coverage:
        """The part of an update's coverage that writes ``model``, by its own parameter names."""
        prefix = self.prefix_of(model)
        if not prefix:
            return {name: ranges for name, ranges in coverage.items() if self.targets_name(name)}
        return {name[len(prefix) :]: ranges for name, ranges in coverage.items() if name.startswith(prefix)}

    def written_by(self, coverage: Coverage) -> tuple[torch.nn.Module, ...]:
        """The members an update with this coverage writes (to prepare and post-process): the target and the drafts
        that read its checkpoint always, a draft with its own only where the update carries it."""
        own = [
            d.model
            for d in self.drafts
            if d.reads_target_checkpoint or any(name.startswith(d.prefix) for name in coverage)
        ]
        return (self.target, *own)


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr() or id(p)  # an empty storage has no address: identity alone then


def prefixed(prefix: str, coverage: dict) -> dict:
    return {prefix + name: value for name, value in coverage.items()} if prefix else dict(coverage)


def draft_prefixes(count: int) -> list[str]:
    """One draft runner is ``draft.`` (SGLang's name, and the loader's for a draft's own tensors); several are
    ``draft0.``, ``draft1.``, ..."""
    return [DRAFT_PREFIX] if count == 1 else [f"draft{i}." for i in range(count)]
