"""Tensor names as a trainer holds them.

transformers 5 renames some checkpoints' tensors as it loads them (Qwen2.5-VL: ``visual.*`` -> ``model.visual.*``,
``model.*`` -> ``model.language_model.*``), so a trainer's ``named_parameters()`` differ from the files SGLang's
``load_weights`` was written for: SGLang's Qwen2.5-VL raises ``KeyError`` on some and drops others silently. For a
served model whose architecture transformers renames, the model's ``load_weights`` is handed the checkpoint's names:
transformers' own renamings for that architecture class, reversed, as its ``save_pretrained`` writes them (Gemma-3,
which transformers renames by model type only, from a table of its released names here). A name already
in the checkpoint's form matches none of them and passes unchanged; a name that maps to no weight is refused by the
pre-update check under the name it came with (the dry run follows tensors, not names).

Decided once per model, when SGLang builds it: the wrap is installed only where there is a renaming.
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


def accept_trainer_names(model: torch.nn.Module) -> CheckpointNames | None:
    """After SGLang builds ``model``: where transformers renames its architecture's tensors, wrap its
    ``load_weights`` so that every load (the plugin's, SGLang's own, the pre-update check's dry run) sees checkpoint
    names."""
    names = checkpoint_names_for(getattr(model, "config", None))
    if names is None:
        return None
    model.load_weights = _renaming(model.load_weights, names)
    logger.info("%s: accepting a trainer's tensor names (transformers' renamings, reversed)", names.architecture)
    return names


def _renaming(load_weights: Callable, names: CheckpointNames) -> Callable:
    @functools.wraps(load_weights)
    def load(weights: Iterable[tuple[str, torch.Tensor]], *args, **kwargs):
        return load_weights(((names(name), tensor) for name, tensor in weights), *args, **kwargs)

    return load
