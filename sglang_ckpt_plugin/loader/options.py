"""The loader's options as one typed, frozen value: built once from the command line (``cli.parse_args``), then
passed, never changed in place (``with_`` makes the value one decision or one checkpoint needs).

The command line's parser (``cli.build_parser``) holds the defaults and the help; these fields are its
destinations, so a flag added there and not here fails at the first parse, not somewhere along the way.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderOptions:
    # what to push, and where
    checkpoint_path: str | None
    draft_checkpoint_path: str | None  # a draft model's own checkpoint, pushed with the target's in one update
    checkpoint_name: str
    weight_version: str | None
    endpoint: str
    uds: str | None
    api_key: str | None
    inference_parallel_size: int
    nnodes: int  # nodes of one run, each its own loader rank(s) (node_rank of nnodes, meeting at master_addr)
    node_rank: int
    master_addr: str | None
    master_port: int
    update_method: str  # broadcast | p2p | all
    ranks: str | None  # p2p: the loader ranks whose instances are updated
    p2p_transport: str  # auto | torch | mooncake: what moves a p2p update's buckets
    save_metas_file: str | None
    load_metas_file: str | None
    # how the bytes move
    bucket_size: int  # 0: auto
    num_buffers: int
    transfer: str  # auto | map | copy
    use_kept_buffers: str  # auto | off: fill the buffers a --keep-update-buffers server keeps
    device: str  # auto | cpu | cuda
    direct_io: str  # auto | on | off
    no_read_ahead: bool
    verify: bool
    # what the server is asked to do with them
    partial: bool
    allow_unused: bool
    two_phase: str  # auto | on | off
    staging_budget: int  # 0: 80% of MemAvailable
    commit_retries: int
    no_flush_cache: bool
    # the run itself
    timeout: float
    sleep_time: float
    quiet: bool
    # --watch: stay resident
    watch: str | None
    ready_marker: str | None
    poll_s: float
    status_file: str | None
    # decided by cli.main, not given: this one process feeds every rank of the server (no torchrun)
    feeds_instance: bool = False

    @classmethod
    def from_namespace(cls, parsed: argparse.Namespace) -> LoaderOptions:
        return cls(**vars(parsed))

    def with_(self, **changes) -> LoaderOptions:
        return dataclasses.replace(self, **changes)

    def for_checkpoint(self, path: str, version: str) -> LoaderOptions:
        """The options of one update of a resident loader: that checkpoint, named and versioned by its directory."""
        return self.with_(checkpoint_path=path, weight_version=version, checkpoint_name=version)
