"""Where the plugin attaches to SGLang (registered through SGLang's own HookRegistry; ``load_plugins()`` applies
them in every SGLang process). Target names live in sglang_compat.py.

- ``ServerArgs.add_cli_args`` (after): our server flags.
- ``http_server.launch_server`` (before): the readiness gate middleware and our route wrappers on ``app``.
- ``http_server._wait_weights_ready`` (replace): wait without falling through to dummy weights.
- model runner ``update_weights_from_ipc`` (replace): our zero-copy receiver instead of checkpoint-engine.
- model runner ``load_weights_from_distributed`` / ``update_weights_from_tensor`` / ``update_weights_from_disk``
  (around): dry run first, agree across TP ranks, record what was written; the scheduler's
  ``begin_weight_update`` / ``end_weight_update`` (around): a trainer session's coverage counts at its end.
- the scheduler's weight-update handlers (ipc / disk / tensor / distributed) and ``Scheduler.get_internal_state``
  (around), and ``Scheduler._pp_send_pyobj_to_next_stage`` (after): with pipeline stages every stage handles them
  together, once relayed (pipeline.py); the internal state carries our weights state for the HTTP process.
- ``Scheduler.handle_generate_request`` (around): refuse requests while the weights are incomplete.
- ``model_loader.loader._initialize_model`` (after): the layout of each quantized module's parameters as its loaders
  write them, before any post-processing (postprocessed.py).
- ``DefaultModelLoader.postprocess_weights`` (around): at the end of a trainer session, the quantized modules it
  wrote whole are post-processed once, the others left as served.
- ``model_loader.loader.initialize_dummy_weights`` (around): with ``--wait-for-initial-weights`` the random fill
  of ``--load-format dummy`` is skipped (nothing is served before every parameter was written).
- ``parallel_state.init_model_parallel_group`` (before): on CPU, no pynccl communicator (it requires CUDA);
  gloo carries the TP group, which is what makes ``--tp 2`` run on a CPU-only machine.
- ``Engine._launch_subprocesses`` (before; the HTTP server and ``sglang.Engine`` both start their schedulers
  there): on CPU, one core range per rank in ``SGLANG_CPU_OMP_THREADS_BIND`` when the user set none.
"""

from __future__ import annotations

import logging
import os

import msgspec
import torch

from ..cpu_env import core_binds
from . import (
    gate,
    kept_buffers,
    options,
    pipeline,
    postprocessed,
    prefault,
    rank_state,
    routes,
    staging,
    tp_worker,
    trainer_names,
    trainer_updates,
)
from . import sglang_compat as sg

logger = logging.getLogger("sglang_ckpt_plugin")


def hook_table() -> list[tuple[str, object, str]]:
    """(target, our function, hook type name) for every hook; also what the release check resolves."""
    runner, manager = sg.RUNNER_WEIGHT_UPDATER, sg.SCHEDULER_WEIGHT_UPDATER
    together = pipeline.at_every_stage_together
    updates = ("ipc", "disk", "tensor", "distributed")  # the scheduler's update_weights_from_<path> handlers
    return [
        (sg.SERVER_ARGS, lambda _result, parser: options.add_server_flags(parser, sg.WAIT_FLAG_FIELD), "AFTER"),
        (f"{sg.HTTP_SERVER}.launch_server", _before_launch_server, "BEFORE"),
        (f"{sg.HTTP_SERVER}._wait_weights_ready", gate.wait_for_initial_weights, "REPLACE"),
        (f"{runner}.update_weights_from_ipc", tp_worker.update_weights_from_ipc, "REPLACE"),
        (f"{runner}.load_weights_from_distributed", trainer_updates.load_weights_from_distributed, "AROUND"),
        (f"{runner}.update_weights_from_tensor", trainer_updates.update_weights_from_tensor, "AROUND"),
        (f"{runner}.update_weights_from_disk", trainer_updates.update_weights_from_disk, "AROUND"),
        (f"{manager}.begin_weight_update", trainer_updates.begin_session, "AROUND"),
        (f"{manager}.end_weight_update", trainer_updates.end_session, "AROUND"),
        *((f"{manager}.update_weights_from_{path}", together(_handle), "AROUND") for path in updates),
        (f"{sg.SCHEDULER}.get_internal_state", together(_with_weights_state), "AROUND"),
        (sg.PIPELINE_RELAY, pipeline.after_relay, "AFTER"),
        (f"{sg.SCHEDULER}.handle_generate_request", _guard_generate, "AROUND"),
        (f"{sg.PARALLEL_STATE}.init_model_parallel_group", _no_pynccl_on_cpu, "BEFORE"),
        (f"{sg.MODEL_LOADER}.initialize_dummy_weights", _skip_dummy_fill_when_waiting, "AROUND"),
        (f"{sg.MODEL_LOADER}._initialize_model", _after_model_built, "AFTER"),
        (f"{sg.MODEL_LOADER}.DefaultModelLoader.postprocess_weights", trainer_updates.post_process_session, "AROUND"),
        (f"{sg.ENGINE}._launch_subprocesses", _bind_cpu_cores, "BEFORE"),
    ]


def install_hooks() -> None:
    """Register every hook, after checking that this SGLang has every target. SGLang logs and skips a plugin whose
    register() raises an Exception, and skips a hook whose target is missing: a server started with
    --wait-for-initial-weights would then come up without its gate. SystemExit is not an Exception: the start
    fails, with one line naming the supported releases."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    table = hook_table()
    problem = sg.release_problem([target for target, _, _ in table])
    if problem is not None:
        raise SystemExit(problem)
    for target, function, kind in table:
        HookRegistry.register(target, function, getattr(HookType, kind))


def _before_launch_server(server_args, *args, **kwargs):
    routes.install(sg.http_app(), wait_for_weights=sg.wait_flag_in(server_args))


def _handle(original, owner, recv_req, *args, **kwargs):
    rank_state.know_models(owner)  # before any runner of this update reads the weights state
    return original(owner, recv_req, *args, **kwargs)


def _with_weights_state(original, scheduler, recv_req, *args, **kwargs):
    """SGLang's internal state with ours added. An error in the staging report must not take the scheduler down:
    without our entry the HTTP process closes the gate."""
    result = original(scheduler, recv_req, *args, **kwargs)
    report = msgspec.to_builtins(rank_state.state(rank_state.know_models(scheduler).target).report())
    report["placement"] = msgspec.to_builtins(rank_state.placement(*sg.scheduler_rank(scheduler)))  # collective
    try:
        report["staging"] = msgspec.to_builtins(staging.report())
    except Exception:
        logger.exception("could not report the staged update")
    sg.add_internal_state(result, pipeline.whole_model_report(report))  # collective with pipeline stages
    return result


def _guard_generate(original, scheduler, recv_req, **kwargs):
    """Scheduler-side guard, on every TP rank: a request that got past the HTTP gate (queued before an update
    failed part-way, or sent while the weights were never complete) must not run. SGLang's own admission-error
    path aborts it with our message (status 500)."""
    if not rank_state.weights_complete():
        kwargs["mm_input_error"] = tp_worker.INCOMPLETE_REFUSAL
    return original(scheduler, recv_req, **kwargs)


def _after_model_built(model, *args, **kwargs):
    """AFTER SGLang builds a model (target or draft), before any load: the layout its quantized modules' loaders
    write, which every later update restores (postprocessed.py); a trainer's tensors accepted where transformers
    renames the architecture's or stacks its experts (trainer_names.py)."""
    postprocessed.record(model)
    trainer_names.accept_trainer_names(model)
    return None


def _skip_dummy_fill_when_waiting(original, model, *args, **kwargs):
    """Parameters stay allocated and unfilled: nothing reads them before every one of them was written. Their CPU
    pages are allocated in the background meanwhile, so the first push does not pay for it (prefault.py), and so
    are the update buffers the server keeps (kept_buffers.py)."""
    if sg.wait_flag_enabled():
        logger.info("--wait-for-initial-weights: not filling dummy weights with random values")
        prefault.populate_in_background(model)
        kept_buffers.reserve_for_first_push(model)
        return None
    return original(model, *args, **kwargs)


def _bind_cpu_cores(*args, **kwargs):
    """BEFORE hook, in the launching process: SGLang asserts on a CPU server with more ranks than NUMA nodes unless
    SGLANG_CPU_OMP_THREADS_BIND names one core range per rank; the spawned schedulers inherit what is set here."""
    server_args = kwargs.get("server_args", args[1] if len(args) > 1 else None)
    if server_args is None or os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        return None
    device, ranks = sg.launch_layout(server_args)
    if device == "cpu" and ranks > 1:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = core_binds(ranks)
        logger.info(
            "SGLANG_CPU_OMP_THREADS_BIND=%s (one core range per rank, set by sglang-ckpt-plugin)",
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"],
        )
    return None


def _no_pynccl_on_cpu(*args, **kwargs):
    """BEFORE hook: returns the (args, kwargs) SGLang then calls with; pynccl only where CUDA exists."""
    if not torch.cuda.is_available():
        kwargs["use_pynccl"] = False
    return args, kwargs
