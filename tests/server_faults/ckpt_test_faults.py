"""A second SGLang plugin, for the tests only: SGLang loads it (entry point group ``sglang.srt.plugins``) in every
server process when this directory is on the server's PYTHONPATH, as it loads sglang-ckpt-plugin.

Armed by files in ``$CKPT_TEST_FAULTS_DIR``:
- ``fail-next-commit``: the next commit of a staged update on this rank loads its first bucket into the model,
  then fails (the file is consumed), as a commit that dies part-way would.
- ``refuse-next-stage``: the next stage request this rank takes is refused before it receives anything (the
  file is consumed: on a server with data-parallel replicas, one replica refuses and the others stage).
- ``hold-dry-run``: the next dry run of an update (the model's ``load_weights`` given meta tensors) stops at its
  first tensor, says so by creating ``dry-run-held``, and goes on when the test removes ``hold-dry-run``: a
  manifest check held open, so that the test can overlap it with another load deterministically.
The plugin under test is not changed; this wraps its commit and the model's ``load_weights`` from outside.

A second entry point, ``ckpt_test_gloo_tp``, is the reference servers' only plugin where SGLang alone cannot start
on this CPU: with ``--tp 2`` SGLang makes a pynccl communicator, which needs CUDA; this turns pynccl off (gloo then
carries the TP group), written here independently of sglang-ckpt-plugin's own hook, so that a reference server
``SGLANG_PLUGINS=ckpt_test_gloo_tp`` runs none of the plugin's code. A third, ``ckpt_test_cpu_draft``, likewise lets a
server with a speculative-decoding draft model start on this CPU (``cpu_draft_start``), with or without our plugin.
"""

import itertools
import os
import threading
import time
from pathlib import Path

HOLD_LIMIT_S = 120.0


def _dir() -> Path:
    return Path(os.environ.get("CKPT_TEST_FAULTS_DIR", "/nonexistent"))


def _fail_next_commit():
    from sglang_ckpt_plugin.server import receiver

    original = receiver.ReceiveSession.commit

    def commit(self):
        flag = _dir() / "fail-next-commit"
        try:
            flag.unlink()
        except FileNotFoundError:
            return original(self)
        load, loaded = self.load_weights, []

        def load_then_fail(weights):
            if loaded:
                raise RuntimeError("commit fault injected by the test")
            loaded.append(True)
            return load(weights)

        self.load_weights = load_then_fail
        try:
            return original(self)
        finally:
            self.load_weights = load

    receiver.ReceiveSession.commit = commit


def _hold_dry_runs():
    from sglang.srt.models.llama import LlamaForCausalLM

    original = LlamaForCausalLM.load_weights
    holding = threading.Lock()

    def load_weights(self, weights):
        weights = iter(weights)  # the dry run hands over a generator of meta tensors: look at its first
        first = next(weights, None)
        if first is not None:
            weights = itertools.chain([first], weights)
        is_dry_run = first is not None and first[1].is_meta
        if is_dry_run and (_dir() / "hold-dry-run").exists() and holding.acquire(blocking=False):
            try:
                (_dir() / "dry-run-held").touch()
                deadline = time.monotonic() + HOLD_LIMIT_S
                while (_dir() / "hold-dry-run").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                (_dir() / "dry-run-held").unlink(missing_ok=True)
                holding.release()
        return original(self, weights)

    LlamaForCausalLM.load_weights = load_weights


def _refuse_next_stage():
    from sglang_ckpt_plugin.server import tp_worker
    from sglang_ckpt_plugin.server.receiver import UpdateRefused

    original = tp_worker._session

    def session(updater, model, device, endpoint, staging):
        if staging:
            try:
                (_dir() / "refuse-next-stage").unlink()
            except FileNotFoundError:
                pass
            else:
                raise UpdateRefused("stage refused by the test's fault")
        return original(updater, model, device, endpoint, staging)

    tp_worker._session = session


def gloo_tp_only():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    def no_pynccl(*args, **kwargs):
        kwargs["use_pynccl"] = False
        return args, kwargs

    HookRegistry.register("sglang.srt.distributed.parallel_state.init_model_parallel_group", no_pynccl, HookType.BEFORE)


def cpu_draft_start():
    """Lets a server with a draft model start on this CPU, for the weights only: SGLang 0.5.23 has no draft
    attention backend for ``torch_native`` ("EAGLE is not supported in decode attention backend torch_native"), so
    the draft's decode and extend backends are left out. Such a server loads, updates and checksums its target and
    draft models; it cannot decode (SGLang's CPU spec-decoding path also needs ``assign_req_to_token_pool_cpu``)."""
    import torch
    from sglang.srt.speculative import draft_utils

    if not torch.cuda.is_available():  # DeepSeek's set_embed_and_head (a NextN draft shares the target's) syncs CUDA
        torch.cuda.synchronize = lambda *args, **kwargs: None
    draft_utils.DraftBackendFactory.create_decode_backend = lambda self: None
    draft_utils.DraftBackendFactory.create_draft_extend_backend = lambda self: None


def register():
    _fail_next_commit()
    _refuse_next_stage()
    _hold_dry_runs()
