"""The models one scheduler process writes: the target and its speculative-decoding draft models.

A draft that reads the target's own checkpoint (DeepSeek-V3's MTP/NextN layers, Qwen3-Next, GLM-4.5, or any draft
whose ``--speculative-draft-model-path`` is the target's) is written by the same update, from the same bytes, in the
same critical section: each bucket goes to the target's ``load_weights``, then to each draft's, which keeps what it
loads (a NextN draft keeps layer N and the shared embeddings) and ignores the rest. Its parameters count for the
gate as ``draft.<name>`` (SGLang's own ``/weights_checker`` names them so): a server is complete only when the
target and every draft are. A draft that reads a checkpoint of its own (EAGLE/EAGLE3/STANDALONE with a separate
path) cannot be written from the target's bytes: an update is refused, in words, before a byte moves.

The set is decided once per process (``ModelSet``), from SGLang's scheduler, and every update path reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coverage import Coverage, Extent, extent_of, missing_from, whole
from .validate import CheckedUpdate, UpdateRejected, check_update, merge_together, required_coverage

DRAFT_PREFIX = "draft."  # SGLang's /weights_checker names a draft runner's parameters so


@dataclass(frozen=True)
class Draft:
    prefix: str  # its parameters' names in the weights state: "draft." + the draft model's own name
    model: torch.nn.Module
    checkpoint: str  # the checkpoint it loads at start (a resolved path)
    reads_target_checkpoint: bool


@dataclass(frozen=True)
class ModelSet:
    target: torch.nn.Module
    drafts: tuple[Draft, ...] = ()

    @property
    def written_drafts(self) -> tuple[Draft, ...]:
        return tuple(d for d in self.drafts if d.reads_target_checkpoint)

    def refusal(self) -> str | None:
        """Why an update of this server cannot be pushed (None: it can)."""
        own = [d.checkpoint for d in self.drafts if not d.reads_target_checkpoint]
        if not own:
            return None
        return (
            f"this server's speculative-decoding draft model loads a checkpoint of its own ({own[0]}), not the "
            "target's; sglang-ckpt-plugin writes draft models that read the target's checkpoint (MTP/NextN layers, "
            "or --speculative-draft-model-path equal to --model-path) with the same update, and refuses to move "
            "the target alone (a stale draft would serve with the new target): serve a draft that reads the "
            "target's checkpoint, or run without a draft model"
        )

    def required(self) -> dict[str, Extent]:
        """Every parameter the gate waits for: the target's, then each written draft's own under its prefix."""
        extents = required_coverage(self.target)
        for draft in self.written_drafts:
            extents.update(prefixed(draft.prefix, self.own_parameters(draft.model)))
        return extents

    def own_parameters(self, model: torch.nn.Module) -> dict[str, Extent]:
        """A member's parameters, less those it shares with the target: an EAGLE/NextN draft serves with the
        target's embeddings and lm_head (SGLang's ``set_embed_and_head``), written when the target's are."""
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

    def check(self, manifest, partial: bool, allow_unused: bool) -> CheckedUpdate:
        """The target's check, then each written draft's over the same manifest: a draft ignores what it does not
        hold (most of the checkpoint), but what it holds must fit, and a complete update must cover it whole."""
        checked = check_update(self.target, manifest, partial, allow_unused)
        coverage, groups = dict(checked.coverage), list(checked.together)
        for draft in self.written_drafts:
            own = self.own_parameters(draft.model)
            drafted = check_update(draft.model, manifest, partial=True, allow_unused=True)
            written = {name: ranges for name, ranges in drafted.coverage.items() if name in own}
            missing = missing_from(own, written)
            if missing and not partial:
                raise UpdateRejected(
                    f"the update does not cover {len(missing)} parameter(s) of the draft model: "
                    f"{', '.join(draft.prefix + m for m in missing[:5])}; the draft reads the target's checkpoint "
                    "(its MTP/NextN layers): push a checkpoint that holds them, or ask for a partial update",
                    "uncovered",
                )
            coverage.update(prefixed(draft.prefix, written))
            groups += drafted.together
        return CheckedUpdate(coverage, merge_together(groups))

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """One bucket into the target, then into every written draft (each copies what it holds)."""
        self.target.load_weights(weights)
        for draft in self.written_drafts:
            draft.model.load_weights(weights)

    def members(self) -> tuple[torch.nn.Module, ...]:
        return (self.target, *(d.model for d in self.written_drafts))


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr() or id(p)  # an empty storage has no address: identity alone then


def prefixed(prefix: str, coverage: dict) -> dict:
    return {prefix + name: value for name, value in coverage.items()} if prefix else dict(coverage)


def draft_prefixes(count: int) -> list[str]:
    """One draft runner is ``draft.`` (SGLang's name); several are ``draft0.``, ``draft1.``, ..."""
    return [DRAFT_PREFIX] if count == 1 else [f"draft{i}." for i in range(count)]
