"""Which checkpoints under a watched directory are complete and ready to push (``--watch DIR``).

A checkpoint is a step directory directly under DIR (``DIR/step-1200/``) holding safetensors files. It is ready
when it is complete and has settled:

- complete: the files the checkpoint names are all there with every byte their headers promise
  (``read_checkpoint``: the index's shards, or every ``*.safetensors``), and where shards are named
  ``…-00002-of-00004.safetensors`` (what ``save_pretrained`` writes) all four are present, so a writer that
  writes the index last is never caught between two shards;
- settled: no file in it changed size or mtime between two scans (``poll_s`` apart), which catches a writer that
  sizes a file before filling it;
- or, with ``marker`` (e.g. ``COMPLETE``), the trainer says so by writing that file last: then only the marker
  and completeness count (no settling wait).

Newest last: by the last number in the directory name (``step-1200`` > ``step-900``), then by name (a file
added later, such as a tokenizer, does not make a checkpoint newer). The version pushed is the directory name.
Pure file-system reads, no torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, read_checkpoint

SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
STEP_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class Candidate:
    path: str
    version: str  # the directory's name: the weight_version servers report after the push
    order: tuple  # newest sorts last
    signature: tuple  # (name, size, mtime_ns) of every file: a changed directory is a new candidate


def order_key(path: Path) -> tuple:
    found = STEP_NUMBER.search(path.name)
    return (int(found.group(1)) if found else -1, path.name)


def signature(path: Path) -> tuple:
    out = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            out.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint yet, or None."""
    names = [p.name for p in path.glob("*.safetensors")]
    totals = {int(m.group(2)) for n in names if (m := SHARD_NAME.search(n))}
    for total in totals:
        have = {int(m.group(1)) for n in names if (m := SHARD_NAME.search(n)) and int(m.group(2)) == total}
        if have != set(range(1, total + 1)):
            return f"{len(have)} of {total} shards present"
    try:
        read_checkpoint(path)
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


@dataclass
class CheckpointWatch:
    """Scans ``root`` on each call to ``ready()``; remembers each directory's last signature to see it settle."""

    root: Path
    marker: str | None = None
    _seen: dict[str, tuple] = field(default_factory=dict)

    def ready(self) -> list[Candidate]:
        """Complete, settled checkpoints, oldest first."""
        out, seen = [], {}
        try:
            dirs = [Path(e.path) for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        for path in dirs:
            try:
                sig = signature(path)
                if self.marker is not None:
                    ready = (path / self.marker).is_file()
                else:
                    ready = self._seen.get(str(path)) == sig  # unchanged since the last scan
                seen[str(path)] = sig
                if ready and any(name.endswith(".safetensors") for name, _, _ in sig):
                    if incomplete_reason(path) is None:
                        out.append(Candidate(str(path), path.name, order_key(path), sig))
            except OSError:  # removed or renamed while we looked: it is not ready
                continue
        self._seen = seen
        return sorted(out, key=lambda c: c.order)
