"""Tensor names as a trainer holds them.

transformers 5 renames some checkpoints' tensors as it loads them (Qwen2.5-VL: ``visual.*`` -> ``model.visual.*``,
``model.*`` -> ``model.language_model.*``), so a trainer's ``named_parameters()`` differ from the files SGLang's
``load_weights`` was written for: SGLang's Qwen2.5-VL raises ``KeyError`` on some and drops others silently. For a
served model whose architecture transformers renames, the model's ``load_weights`` is handed the checkpoint's names:
transformers' own renamings for that architecture class, reversed, as its ``save_pretrained`` writes them (Gemma-3,
which transformers renames by model type only, from a table of its released names here). A name already
in the checkpoint's form matches none of them and passes unchanged; a name that maps to no weight is refused by the
pre-update check under the name it came with (the dry run follows tensors, not names).

transformers 5 also holds a mixture-of-experts layer's experts as one tensor (Qwen3-MoE, Qwen2-MoE, DeepSeek-V2/V3,
GLM-4-MoE, OLMoE: ``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] and ``mlp.experts.down_proj``)
where the checkpoint and SGLang's loaders have one tensor per expert and projection. Such a tensor is split into the
checkpoint's per-expert tensors (views of it, no copy), as transformers' own converter for the model type says they
were stacked and concatenated; only converters that stack experts and concatenate equal parts are followed (a
transposing one would turn the checkpoint's own fused names around). Their model type's renamings are not (Mixtral's
``block_sparse_moe`` -> ``mlp``: see ``checkpoint_names_for``), so a Mixtral trainer's names stay refused by name.
A class that reads stacked experts itself (SGLang's Qwen3.5-MoE, for its released files) is handed the per-expert
tensors all the same: the same weights, through more loader calls.

Decided once per model, when SGLang builds it: the wrap is installed only where there is a renaming or a split.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointNames:
    """transformers' renamings of one architecture, reversed (trainer name -> checkpoint name)."""

    architecture: str
    reversed_renames: tuple  # transformers WeightRenaming (or PrefixRename), applied in order

    def __call__(self, name: str) -> str:
        for rename in self.reversed_renames:
            name, _ = rename.rename_source_key(name)
        return name


@dataclass(frozen=True)
class PrefixRename:
    """One renaming of a name's prefix, with transformers' WeightRenaming interface."""

    old: str
    new: str

    def rename_source_key(self, name: str) -> tuple[str, str | None]:
        return (self.new + name.removeprefix(self.old), self.old) if name.startswith(self.old) else (name, None)


# Architectures transformers renames by model type only, whose released files SGLang's class loads: the trainer's
# names turned into the released ones here. Gemma-3: transformers 5 holds ``model.language_model.*`` /
# ``model.vision_tower.*`` (no ``vision_model.``) / ``model.multi_modal_projector.*``.
_RELEASED_NAMES = {
    "Gemma3ForConditionalGeneration": (
        PrefixRename("model.language_model.", "language_model.model."),
        PrefixRename("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        PrefixRename("model.vision_tower.", "vision_tower.vision_model."),
        PrefixRename("model.multi_modal_projector.", "multi_modal_projector."),
        PrefixRename("lm_head.", "language_model.lm_head."),
    ),
}


def checkpoint_names_for(config) -> CheckpointNames | None:
    """The reversed renamings transformers registers for this config's architecture class (Qwen2-VL, Qwen2.5-VL,
    GPT-NeoX), or None where it registers none. Only those keyed by the class: transformers' mappings by model type
    describe checkpoints other than the ones SGLang's classes load (Qwen3.5's text model reads multimodal
    ``model.language_model.*`` files; Kimi-Linear renames ``mlp`` to ``block_sparse_moe``), and reversed they would
    rename a checkpoint's own names (tests/test_family_matrix.py pushes checkpoint names into every family)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings: its names are the checkpoint's
        return None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture in _RELEASED_NAMES:
        return CheckpointNames(architecture, _RELEASED_NAMES[architecture])
    mapping = get_checkpoint_conversion_mapping(architecture) if architecture else None
    renames = [t.reverse_transform() for t in mapping or () if isinstance(t, WeightRenaming)]
    return CheckpointNames(architecture, tuple(reversed(renames))) if renames else None


@dataclass(frozen=True)
class ExpertSplit:
    """One kind of stacked experts tensor a transformers 5 model holds, and the checkpoint's tensors it stacks:
    ``parts`` (``*`` for the expert's index) stacked along ``expert_dim``, then concatenated along ``part_dim`` (of
    the stacked tensor) where there are several."""

    fused: str  # how the trainer's name ends: "mlp.experts.gate_up_proj"
    parts: tuple[str, ...]  # the checkpoint's: ("mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")
    expert_dim: int
    part_dim: int

    def split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """The checkpoint's per-expert tensors (views of ``tensor``), or None where ``name`` is not one of these."""
        if not name.endswith(self.fused):
            return None
        prefix = name.removesuffix(self.fused)
        within_expert = self.part_dim - (self.part_dim > self.expert_dim)
        out = []
        for expert, stacked in enumerate(tensor.unbind(self.expert_dim)):
            pieces = stacked.chunk(len(self.parts), within_expert) if len(self.parts) > 1 else (stacked,)
            out += [(prefix + part.replace("*", str(expert)), piece) for part, piece in zip(self.parts, pieces)]
        return out


def expert_splits_for(config) -> tuple[ExpertSplit, ...]:
    """transformers' converters for this config's model type that stack experts (and concatenate their equal
    parts), as splits; empty where it has none or a transformers without conversion mappings is installed."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:
        return ()
    model_type = getattr(config, "model_type", None)
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    splits = []
    for converter in mapping or ():
        if not isinstance(converter, WeightConverter):
            continue
        ops = getattr(converter, "operations", ())
        # the patterns as written (transformers 5.19 keeps them beside the regular expressions it makes of them)
        sources = [_plain(p) for p in getattr(converter, "_original_source_patterns", ())]
        targets = [_plain(p) for p in getattr(converter, "_original_target_patterns", ())]
        kinds = [type(op) for op in ops]  # one part: stacked only; several: stacked, then concatenated
        stacked = (kinds == [MergeModulelist] and len(sources) == 1) or (
            kinds == [MergeModulelist, Concatenate] and len(sources) > 1
        )
        if not stacked or None in sources or any(s.count("*") != 1 for s in sources):
            continue
        if len(targets) != 1 or None in targets or "*" in targets[0]:
            continue
        part_dim = ops[1].dim if len(ops) == 2 else 0
        splits.append(ExpertSplit(targets[0], tuple(sources), ops[0].dim, part_dim))
    return tuple(splits)


def _plain(pattern: str) -> str | None:
    """A converter's pattern as a plain name ending (``\\.`` unescaped), or None where it is a regular expression."""
    plain = pattern.replace("\\.", ".")
    return plain if all(c.isalnum() or c in "._*" for c in plain) else None


@dataclass(frozen=True)
class TrainerForm:
    """A trainer's (name, tensor) turned into the checkpoint's: split where experts are stacked, then renamed."""

    names: CheckpointNames | None
    splits: tuple[ExpertSplit, ...]

    def to_checkpoint(self, weights: Iterable[tuple[str, torch.Tensor]]):
        for name, tensor in weights:
            parts = next((p for s in self.splits if (p := s.split(name, tensor)) is not None), [(name, tensor)])
            for part, piece in parts:
                yield (self.names(part) if self.names else part), piece

    def describe(self) -> str:
        what = [f"{self.names.architecture}'s renamings, reversed"] if self.names else []
        return ", ".join(what + [f"{s.fused} split per expert" for s in self.splits])


def trainer_form_for(config) -> TrainerForm | None:
    names, splits = checkpoint_names_for(config), expert_splits_for(config)
    return TrainerForm(names, splits) if names or splits else None


def accept_trainer_names(model: torch.nn.Module) -> TrainerForm | None:
    """After SGLang builds ``model``: where transformers renames its architecture's tensors or stacks its experts,
    wrap its ``load_weights`` so that every load (the plugin's, SGLang's own, the pre-update check's dry run) sees
    the checkpoint's tensors."""
    form = trainer_form_for(getattr(model, "config", None))
    if form is None:
        return None
    model.load_weights = _in_checkpoint_form(model.load_weights, form)
    logger.info("accepting tensors as a transformers trainer holds them (%s)", form.describe())
    return form


def _in_checkpoint_form(load_weights: Callable, form: TrainerForm) -> Callable:
    @functools.wraps(load_weights)
    def load(weights: Iterable[tuple[str, torch.Tensor]], *args, **kwargs):
        return load_weights(form.to_checkpoint(weights), *args, **kwargs)

    return load
