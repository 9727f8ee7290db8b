"""Every touch-point on SGLang internals, for SGLang 0.5.23. A new SGLang release is this file's work.

Hooks (registered through SGLang's own HookRegistry, applied by ``load_plugins()`` in every process):
- ``ServerArgs.add_cli_args`` (after): our server flags.
- ``http_server.launch_server`` (before): the readiness gate middleware and our route wrappers on ``app``.
- ``http_server._wait_weights_ready`` (replace): wait without falling through to dummy weights.
- ``WeightUpdater.update_weights_from_ipc`` (replace, model-runner side): our zero-copy receiver instead
  of the checkpoint-engine package; ``update_weights_from_disk`` (after): a full reload makes weights complete.
- ``Scheduler.handle_generate_request`` (around): refuse requests while the weights are incomplete.
- The trainer path: the model runner's ``load_weights_from_distributed`` (around: dry run first, remember
  what was loaded) and the scheduler's ``end_weight_update`` (around: mark a session that covered the model).
- ``model_loader.loader.initialize_dummy_weights`` (around): with ``--wait-for-initial-weights`` the random fill
  of ``--load-format dummy`` is skipped (the gate keeps the weights unused until real ones arrive; on CPU
  the fill costs several times more than reading the real weights).
- ``parallel_state.init_model_parallel_group`` (before): on CPU, no pynccl communicator (it requires CUDA);
  gloo carries the TP group, which is what makes ``--tp 2`` run on a CPU-only machine.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("sglang_ckpt_plugin")

SERVER_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
HTTP_SERVER = "sglang.srt.entrypoints.http_server"
RUNNER_WEIGHT_UPDATER = "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater"
SCHEDULER_WEIGHT_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
WAIT_FLAG_FIELD = "checkpoint_engine_wait_weights_before_ready"
PARALLEL_STATE = "sglang.srt.distributed.parallel_state"
MODEL_LOADER = "sglang.srt.model_loader.loader"


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import gate, options, tp_worker, trainer_updates

    HookRegistry.register(SERVER_ARGS, lambda _result, parser: options.add_server_flags(parser, WAIT_FLAG_FIELD))
    HookRegistry.register(f"{HTTP_SERVER}.launch_server", _before_launch_server, HookType.BEFORE)
    HookRegistry.register(f"{HTTP_SERVER}._wait_weights_ready", gate.wait_for_initial_weights, HookType.REPLACE)
    HookRegistry.register(
        f"{RUNNER_WEIGHT_UPDATER}.update_weights_from_ipc", tp_worker.update_weights_from_ipc, HookType.REPLACE
    )
    HookRegistry.register(f"{RUNNER_WEIGHT_UPDATER}.update_weights_from_disk", _after_disk_update, HookType.AFTER)
    HookRegistry.register(f"{SCHEDULER}.handle_generate_request", _guard_generate, HookType.AROUND)
    HookRegistry.register(f"{PARALLEL_STATE}.init_model_parallel_group", _no_pynccl_on_cpu, HookType.BEFORE)
    HookRegistry.register(f"{MODEL_LOADER}.initialize_dummy_weights", _skip_dummy_fill_when_waiting, HookType.AROUND)
    HookRegistry.register(f"{RUNNER_WEIGHT_UPDATER}.load_weights_from_distributed",
                          trainer_updates.load_weights_from_distributed, HookType.AROUND)  # fmt: skip
    HookRegistry.register(f"{SCHEDULER_WEIGHT_UPDATER}.end_weight_update", _around_end_session, HookType.AROUND)


def _around_end_session(original, manager, recv_req, **kwargs):
    """A trainer session that reached every parameter counts as a complete update (marker read by routes.py)."""
    import msgspec

    from . import tp_worker, trainer_updates

    out = original(manager, recv_req, **kwargs)
    if out.success and trainer_updates.session_covered_every_parameter():
        tp_worker.mark_weights_complete()
        out = msgspec.structs.replace(out, message=f"{out.message} {trainer_updates.COMPLETE_MARKER}")
    return out


def _skip_dummy_fill_when_waiting(original, model, *args, **kwargs):
    """Parameters stay allocated and unfilled: the real weights arrive before anything reads them."""
    if wait_flag_enabled():
        logger.info("--wait-for-initial-weights: not filling dummy weights with random values")
        return None
    return original(model, *args, **kwargs)


def _no_pynccl_on_cpu(*args, **kwargs):
    """BEFORE hook: returns the (args, kwargs) SGLang then calls with; pynccl only where CUDA exists."""
    if not torch.cuda.is_available():
        kwargs["use_pynccl"] = False
    return args, kwargs


def _after_disk_update(result, *args, **kwargs):
    from . import tp_worker

    if result and result[0]:
        tp_worker.mark_weights_complete()


def _guard_generate(original, scheduler, recv_req, **kwargs):
    """Scheduler-side guard: requests admitted before a failed update (queued on SGLang's model-update
    lock, past the HTTP gate) must not run on partly-new weights. SGLang's own admission-error path aborts
    them with our message (it answers with status 500)."""
    from . import tp_worker

    if not tp_worker.weights_complete():
        kwargs["mm_input_error"] = tp_worker.INCOMPLETE_REFUSAL
    return original(scheduler, recv_req, **kwargs)


def _before_launch_server(*args, **kwargs):
    from . import routes

    routes.install(http_app())


# ---------------------------------------------------------------- main process (HTTP server)
def http_app():
    from sglang.srt.entrypoints import http_server

    return http_server.app


def tokenizer_manager():
    """The TokenizerManager, or None before the server has set its global state."""
    from sglang.srt.entrypoints import http_server

    state = getattr(http_server, "_global_state", None)
    return None if state is None else state.tokenizer_manager


def wait_flag_enabled() -> bool:
    from sglang.srt.runtime_context import get_model

    return bool(getattr(get_model(), WAIT_FLAG_FIELD, False))


def tp_size() -> int:
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_size)


def weights_loaded() -> bool:
    tm = tokenizer_manager()
    return tm is None or bool(getattr(tm, "initial_weights_loaded", True))


def mark_weights_loaded(loaded: bool = True) -> None:
    tm = tokenizer_manager()
    if tm is not None:
        tm.initial_weights_loaded = loaded


def weight_version() -> str | None:
    tm = tokenizer_manager()
    return None if tm is None else tm.config_value("weight_version")


def exit_server(code: int) -> None:
    """Stop the whole server (children first) with a non-zero exit code."""
    from sglang.srt.utils import kill_process_tree

    logging.shutdown()
    kill_process_tree(os.getpid(), include_parent=False)
    os._exit(code)


# ---------------------------------------------------------------- scheduler / TP-worker process
def runner_device(updater) -> torch.device:
    if updater.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(updater.device)


def runner_rank(updater) -> int:
    return updater.tp_rank


def tp_cpu_group():
    """The gloo group of this TP worker's tensor-parallel ranks (None with tp=1)."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    return group.cpu_group if group.world_size > 1 else None


def check_online_update_allowed(updater) -> str | None:
    """Reasons to refuse at once: a draft model (its loader stream does not exist: it would only time out),
    and SGLang's own (weight cache daemon, derived weight caches)."""
    from sglang.srt.model_executor.model_runner_components import weight_updater as wu

    if getattr(updater.get_model_runner(), "is_draft_worker", False):
        return "speculative-decoding draft models are not updated by sglang-ckpt-plugin yet; run without a draft model"

    try:
        updater._assert_weight_cache_inactive("update_weights_from_ipc")
    except Exception as exc:  # SGLang raises a plain error naming the flag to change
        return str(exc)
    return wu._unsupported_derived_weight_cache_error(updater.get_model())


def prepare_model_for_loading(model: torch.nn.Module, device: torch.device) -> None:
    """Undo in-place quantization packing so fresh weights can be loaded (as a disk reload does)."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    DefaultModelLoader.restore_weights_before_loading(model, device)


def post_process_model(model: torch.nn.Module, device: torch.device) -> None:
    """The post-load processing of SGLang's disk loader: quantization repacking, then model fix-ups."""
    from sglang.srt.model_loader.loader import DefaultModelLoader, post_load_weights

    DefaultModelLoader.postprocess_weights(model, device)
    post_load_weights(model)


def model_dtype_context(updater):
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    return set_default_torch_dtype(updater.model_config.dtype)


# ---------------------------------------------------------------- trainer process (sglang_ckpt_plugin.trainer)
def trainer_process_group(backend: str, init_method: str, world_size: int, group_name: str, timeout_s: float):
    """Rank 0 of the group SGLang's ``/init_weights_update_group`` joins (same helper, same store prefix)."""
    import datetime

    from sglang.srt.utils.common import init_custom_process_group

    return init_custom_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=0,
                                     group_name=group_name, timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


FLATTENED_BUCKET_FORMAT = "flattened_bucket"  # SGLang's load_format: tensors packed back to back, as uint8
