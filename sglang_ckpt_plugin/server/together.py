"""Tensors a model only loads in one ``load_weights`` call reach it in one call, whatever buckets they travel in.

DeepSeek-V2/V3 with q-LoRA keeps ``q_a_proj`` until ``kv_a_proj_with_mqa`` of the same layer arrives *in the same
call* and writes both into ``fused_qkv_a_proj_with_mqa``; a bucket boundary between them would drop both. The
check (validate.py) finds such groups from what the dry run's writes were computed from; here a member that
arrives before the rest of its group is copied out of the loader's buffer (which the loader reuses) and held
until the last member arrives, and then the whole group goes to the model with that bucket.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..transport.messages import ProtocolError


class GroupsTogether:
    def __init__(self, groups: Iterable[frozenset[str]]):
        self.group_of = {name: group for group in groups for name in group}
        self.held: dict[str, torch.Tensor] = {}

    def arrange(self, views: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """What to hand ``load_weights`` for one bucket: its tensors, less members of groups not yet complete
        (held as copies), plus every group this bucket completes."""
        if not self.group_of:
            return views
        out, arrived = [], {}
        for name, view in views:
            if name in self.group_of:
                arrived[name] = view
            else:
                out.append((name, view))
        for group in {self.group_of[name] for name in arrived}:
            if all(m in arrived or m in self.held for m in group):
                out.extend((m, arrived[m] if m in arrived else self.held.pop(m)) for m in sorted(group))
            else:
                self.held.update((m, arrived[m].clone()) for m in group if m in arrived)
        return out

    def check_finished(self) -> None:
        if self.held:
            raise ProtocolError(f"tensors held for their fused partners never got them: {sorted(self.held)[:4]}")

    def clear(self) -> None:
        self.held.clear()
