"""Every touch-point on SGLang internals (SGLang 0.5.21-0.5.23): hook target names, the accessors the hooks use,
and the check that a release has all of them. A new SGLang release is this file's work (and hooks.py's table,
if a target moved).

Nothing here imports the rest of the plugin: hooks.py wires SGLang to our modules, and our modules call in
here, so there is no import circle.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("sglang_ckpt_plugin")

SERVER_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ENGINE = "sglang.srt.entrypoints.engine.Engine"
HTTP_SERVER = "sglang.srt.entrypoints.http_server"
RUNNER_WEIGHT_UPDATER = "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater"
SCHEDULER_WEIGHT_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
WAIT_FLAG_FIELD = "checkpoint_engine_wait_weights_before_ready"
PARALLEL_STATE = "sglang.srt.distributed.parallel_state"
MODEL_LOADER = "sglang.srt.model_loader.loader"
PIPELINE_RELAY = f"{SCHEDULER}._pp_send_pyobj_to_next_stage"  # a stage hands its received requests to the next
FP8_MODULE = "sglang.srt.layers.quantization.fp8"
AMX_UTILS = "sglang.srt.layers.amx_utils"
INTERNAL_STATE_KEY = "ckpt_plugin"  # our entry in the scheduler's internal state (GetInternalStateReqOutput)

# ---------------------------------------------------------------- which releases
OLDEST_SUPPORTED = (0, 5, 21)  # the first release with every target below (0.5.20 lacks the trainer path's)
TESTED_RELEASES = ("0.5.21", "0.5.22", "0.5.23")  # `make compat SGLANG=X` (0.5.23: `make test`); README lists them
# Names the accessors below use, besides the hook targets (hooks.py): all must resolve in a supported release.
ACCESSED_NAMES = (
    f"{HTTP_SERVER}.app",
    "sglang.srt.runtime_context.get_model",
    "sglang.srt.runtime_context.get_parallel",
    "sglang.srt.runtime_context.get_observability",
    "sglang.srt.utils.kill_process_tree",
    f"{PARALLEL_STATE}.get_tp_group",
    f"{PARALLEL_STATE}.get_world_group",
    "sglang.srt.layers.utils.PPMissingLayer",
    "sglang.srt.model_executor.model_runner_components.weight_updater._unsupported_derived_weight_cache_error",
    f"{RUNNER_WEIGHT_UPDATER}._assert_weight_cache_inactive",
    f"{MODEL_LOADER}.DefaultModelLoader.restore_weights_before_loading",
    f"{MODEL_LOADER}.DefaultModelLoader.postprocess_weights",
    f"{MODEL_LOADER}.post_load_weights",
    f"{MODEL_LOADER}._modules_with_quant_method",
    f"{MODEL_LOADER}.device_loading_context",
    "sglang.srt.layers.quantization.base_config.FusedMoEMethodBase",
    "sglang.srt.layers.quantization.base_config.LinearMethodBase",
    "sglang.srt.layers.quantization.kv_cache.BaseKVCacheMethod",
    "sglang.srt.lora.layers.BaseLayerWithLoRA",
    "sglang.srt.model_loader.utils.set_default_torch_dtype",
    "sglang.srt.utils.common.init_custom_process_group",
    f"sglang.srt.server_args.ServerArgs.{WAIT_FLAG_FIELD}",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.get_internal_state",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.config_value",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.auto_create_handle_loop",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._update_weight_version_if_provided",
)


def sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return "unknown"


def supported_range() -> str:
    oldest = ".".join(map(str, OLDEST_SUPPORTED))
    return f"SGLang >= {oldest} with every hooked target (tested: {', '.join(TESTED_RELEASES)})"


def resolve(name: str):
    """The object a dotted name points to: its longest module prefix imported (an ImportError inside a module that
    exists is raised as itself, not hidden behind an AttributeError as pkgutil.resolve_name does), then attributes."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i in range(1, len(parts)):
        module = ".".join(parts[: i + 1])
        is_package = hasattr(obj, "__path__")
        if is_package and not hasattr(obj, parts[i]) and importlib.util.find_spec(module) is not None:
            obj = importlib.import_module(module)
        else:
            obj = getattr(obj, parts[i])
    return obj


def missing_names(names) -> list[tuple[str, str]]:
    """(name, why) for each dotted name that does not resolve in the installed SGLang (module, class, function
    or attribute). ``why`` tells a name that is gone from a module that failed to import (an environment
    problem, e.g. a package SGLang imports that does not load on this machine)."""
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError, ValueError) as exc:
            missing.append((name, f"{type(exc).__name__}: {exc}"))
    return missing


def release_problem(targets) -> str | None:
    """One line saying why this SGLang cannot carry the plugin, or None. ``targets``: the hook targets."""
    installed = sglang_version()
    release = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    missing = missing_names([*targets, *ACCESSED_NAMES])
    if not missing and (len(release) < 3 or release >= OLDEST_SUPPORTED):
        if installed not in TESTED_RELEASES:
            logger.warning(
                "sglang-ckpt-plugin has not been tested with SGLang %s (%s); every hooked target resolves",
                installed,
                supported_range(),
            )
        return None
    if missing:
        (name, why), more = missing[0], len(missing) - 1
        what = f"cannot resolve {name} ({why})" + (f" and {more} more" if more else "")
    else:
        what = "older than the oldest supported release"
    return (
        f"sglang-ckpt-plugin does not support SGLang {installed}: {what}; it supports {supported_range()}: "
        "install one of those, or uninstall sglang-ckpt-plugin"
    )


# ---------------------------------------------------------------- the CPU environment (cpu_support/plugin.py)
CPU_FP8_NAMES = (
    f"{FP8_MODULE}._is_cpu_amx_available",
    f"{AMX_UTILS}.cpu_has_amx_support",
    "sglang.srt.utils.common._is_intel_amx_backend_available",
)


def enable_fp8_on_cpu_without_amx(register_ops) -> None:
    """Let SGLang's CPU FP8 path (block and per-tensor linear, FP8 MoE) run on a CPU without AMX, computing with the
    ops ``register_ops()`` defines: only FP8's own switch is turned, so norms, rotary, unquantized layers and every
    other method keep the paths this CPU has. SGLang caches whether the AMX backend exists
    (``_is_intel_amx_backend_available``): it is asked first, before the ops exist, so the answer stays this CPU's."""
    missing = missing_names(CPU_FP8_NAMES)
    if missing:
        logger.warning(
            "sglang-ckpt-plugin: FP8 stays off on this CPU: %s is not in SGLang %s", missing[0][0], sglang_version()
        )
        return
    from sglang.srt.layers import amx_utils
    from sglang.srt.layers.quantization import fp8
    from sglang.srt.utils import common

    common._is_intel_amx_backend_available()
    register_ops()
    fp8._is_cpu_amx_available = True  # fp8.py's refusals and its choice of the packed path
    amx_utils.cpu_has_amx_support = lambda: True  # packing and use_intel_amx_backend, for the layers that ask


# ---------------------------------------------------------------- main process (HTTP server)
def http_app():
    from sglang.srt.entrypoints import http_server

    return http_server.app


def tokenizer_manager():
    """The TokenizerManager, or None before the server has set its global state."""
    from sglang.srt.entrypoints import http_server

    state = getattr(http_server, "_global_state", None)
    return None if state is None else state.tokenizer_manager


def wait_flag_in(server_args) -> bool:
    """The flag as given to ``launch_server(server_args)`` (before SGLang publishes its runtime context)."""
    return bool(getattr(server_args, WAIT_FLAG_FIELD, False))


def wait_flag_enabled() -> bool:
    from sglang.srt.runtime_context import get_model

    return bool(getattr(get_model(), WAIT_FLAG_FIELD, False))


def launch_layout(server_args) -> tuple[str, int]:
    """(device, ranks = tp * dp * pp) of a server about to start, from its own arguments."""
    device = str(getattr(server_args, "device", None) or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = 1
    for name in ("tp_size", "dp_size", "pp_size"):
        ranks *= int(getattr(server_args, name, 1) or 1)
    return device, ranks


def metrics_enabled() -> bool:
    """``--enable-metrics``: SGLang serves /metrics from its multiprocess Prometheus directory."""
    from sglang.srt.runtime_context import get_observability

    try:
        return bool(get_observability().enable_metrics)
    except (AttributeError, RuntimeError, ValueError):  # outside a server: no config published
        return False


def tp_size() -> int:
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_size)


def parallel_sizes() -> dict[str, int]:
    """tp / dp (data-parallel replicas) / pp / attention-DP sizes of this server (1 where this SGLang does not
    publish one)."""
    from sglang.srt.runtime_context import get_parallel

    sizes = {}
    for name in ("tp_size", "dp_size", "pp_size", "attn_dp_size"):
        try:
            sizes[name] = int(getattr(get_parallel(), name))
        except (AttributeError, RuntimeError, ValueError):
            sizes[name] = 1
    return sizes


def replica() -> int | None:
    """The data-parallel replica (``--dp N``) this scheduler process belongs to; None without replicas."""
    from sglang.srt.runtime_context import get_parallel

    try:
        if int(get_parallel().dp_size) < 2:
            return None
        return int(get_parallel().dp_rank)
    except (AttributeError, RuntimeError, ValueError, TypeError):
        return None


def set_initial_weights_loaded(loaded: bool) -> None:
    """SGLang's own readiness flag (its /health and wait loop read it); our gate keeps its own copy."""
    tm = tokenizer_manager()
    if tm is not None:
        tm.initial_weights_loaded = loaded


async def scheduler_internal_states() -> list[dict]:
    """SGLang's internal-state request to the schedulers (one dict per DP rank, from TP rank 0)."""
    return await tokenizer_manager().get_internal_state()


async def stage_on_schedulers(obj) -> tuple[bool, str]:
    """Send an ``UpdateWeightsFromIPCReqInput`` to every scheduler as SGLang's route does, but without its
    model-update writer lock and without recording a weight version (the request names the stage phase)."""
    tm = tokenizer_manager()
    tm.auto_create_handle_loop()
    results = await tm.update_weights_from_ipc_communicator(obj)
    failed = [r.message for r in results if not r.success]
    return not failed, "; ".join(failed) if failed else "; ".join(r.message for r in results)


async def update_on_schedulers(obj) -> list[tuple[bool, str]]:
    """SGLang's ``TokenizerManager.update_weights_from_ipc`` for any number of data-parallel replicas (SGLang
    asserts one, although its communicator fans out to every replica): under the model-update writer lock (unless
    generation is paused, whose holder has it), then the multimodal cache and weight version where every replica
    succeeded. Returns each replica's (success, message)."""
    tm = tokenizer_manager()
    tm.auto_create_handle_loop()
    async with tm.is_pause_cond:
        paused = tm.is_pause
        if paused:
            results = await tm.update_weights_from_ipc_communicator(obj)
    if not paused:
        async with tm.model_update_lock.writer_lock:
            results = await tm.update_weights_from_ipc_communicator(obj)
    outcomes = [(bool(r.success), str(r.message)) for r in results]
    if outcomes and all(ok for ok, _ in outcomes):
        if obj.flush_cache and tm.mm_processor is not None:
            tm.mm_processor.clear_preprocess_cache()
        tm._update_weight_version_if_provided(obj.weight_version)
    return outcomes


async def hold_generation() -> bool:
    """Hold generation as SGLang's pause does, after the requests in flight have finished (SGLang's
    model-update writer lock waits for them): new requests wait at the tokenizer manager's pause condition,
    and weight-update calls skip the writer lock while paused. False if someone else had paused already."""
    tm = tokenizer_manager()
    async with tm.model_update_lock.writer_lock:
        async with tm.is_pause_cond:
            if tm.is_pause:
                return False
            tm.is_pause = True
            return True


async def release_generation() -> None:
    tm = tokenizer_manager()
    async with tm.is_pause_cond:
        tm.is_pause = False
        tm.is_pause_cond.notify_all()


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


def scheduler_rank(scheduler) -> tuple[torch.device, int]:
    """The device and TP rank of a scheduler's (target) model runner."""
    from sglang.srt.runtime_context import get_parallel

    runner = scheduler.tp_worker.model_runner
    kind = str(runner.device).split(":")[0]
    device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    return device, int(get_parallel().tp_rank)


def runner_rank(updater) -> int:
    return updater.tp_rank


def is_draft_runner(updater) -> bool:
    return bool(getattr(updater.get_model_runner(), "is_draft_worker", False))


def _checkpoint_of(runner) -> str:
    return os.path.realpath(str(runner.model_config.model_path))


def target_and_drafts(owner) -> tuple[tuple[torch.nn.Module, str], list[tuple[torch.nn.Module, str]]]:
    """(model, checkpoint path) of the target runner and of each draft runner SGLang updates with it (its
    ``weight_update_runners``: none without speculative decoding, or for NGRAM). ``owner``: the scheduler or its
    weight-updater manager (both hold ``tp_worker`` and ``draft_worker``)."""
    target = owner.tp_worker.model_runner
    listing = getattr(getattr(owner, "draft_worker", None), "weight_update_runners", None)  # 0.5.23's fan-out
    drafts = [runner for _role, runner in listing()] if listing is not None else []
    return (target.model, _checkpoint_of(target)), [(runner.model, _checkpoint_of(runner)) for runner in drafts]


def add_internal_state(output, entry: dict) -> None:
    """Put our structured state into the scheduler's GetInternalStateReqOutput."""
    output.internal_state[INTERNAL_STATE_KEY] = entry


def pipeline_stage() -> tuple[int, int]:
    """(this scheduler's pipeline stage, the number of stages): (0, 1) without ``--pp-size``."""
    from sglang.srt.runtime_context import get_parallel

    try:
        return int(get_parallel().pp_rank), int(get_parallel().pp_size)
    except (AttributeError, RuntimeError, ValueError, TypeError):
        return 0, 1


def tp_rank_and_size() -> tuple[int, int]:
    """(this rank's index in its TP group, the group's size); (0, 1) before SGLang made the group."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    try:
        group = get_tp_group()
        return int(group.rank_in_group), int(group.world_size)
    except (AssertionError, AttributeError, RuntimeError):
        return 0, 1


def model_cpu_group():
    """The gloo group of every rank holding a part of this replica's model (None when this rank holds it alone):
    its TP group, or with pipeline stages every stage's TP ranks (SGLang's world group of the replica)."""
    from sglang.srt.distributed.parallel_state import get_tp_group, get_world_group

    group = get_world_group() if pipeline_stage()[1] > 1 else get_tp_group()
    return group.cpu_group if group.world_size > 1 else None


def held_by_another_stage(model: torch.nn.Module, name: str) -> bool:
    """A checkpoint tensor that lives in a module this pipeline stage holds as SGLang's ``PPMissingLayer`` (another
    stage's decoder layers, embeddings, final norm or ``lm_head``): this stage's ``load_weights`` skips it."""
    from sglang.srt.layers.utils import PPMissingLayer

    module = model
    for part in name.split(".")[:-1]:
        module = module._modules.get(part)
        if module is None:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False


def send_control_output(scheduler, output, recv_req) -> None:
    """Answer a control request after its dispatch (a stage that handled it only once it had relayed it): the first
    stage's TP rank 0 answers the HTTP process, every other rank's sender sends nothing."""
    send = getattr(scheduler, "send_control_output", None)
    if send is not None:
        send(output, recv_req)
    else:  # an SGLang without the deferred-flush helper
        getattr(scheduler, "ipc_channels", scheduler).send_to_tokenizer.send_output(output, recv_req)


def check_online_update_allowed(updater) -> str | None:
    """SGLang's own reasons to refuse at once (weight cache daemon, derived weight caches)."""
    from sglang.srt.model_executor.model_runner_components import weight_updater as wu

    try:
        updater._assert_weight_cache_inactive("update_weights_from_ipc")
    except Exception as exc:  # SGLang raises a plain error naming the flag to change
        return str(exc)
    return wu._unsupported_derived_weight_cache_error(updater.get_model())


def prepare_model_for_loading(model: torch.nn.Module, device: torch.device) -> None:
    """Undo in-place quantization packing so fresh weights can be loaded (as a disk reload does)."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    DefaultModelLoader.restore_weights_before_loading(model, device)


def post_processed_modules(model: torch.nn.Module):
    """(name, module) of every module whose quantization method post-processes what its loaders wrote (a quantized
    linear or fused-MoE method: FP8, INT8, ...); unquantized methods and LoRA wrappers are left out, as SGLang's own
    loader leaves the wrappers out."""
    from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, LinearMethodBase
    from sglang.srt.lora.layers import BaseLayerWithLoRA

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if (
            isinstance(method, (LinearMethodBase, FusedMoEMethodBase))
            and not type(method).__name__.startswith("Unquantized")
            and not isinstance(module, BaseLayerWithLoRA)
        ):
            yield name, module


# Parameters a model class builds but neither loads from any checkpoint nor reads (SGLang 0.5.23): Falcon-H1's
# decoder layers create q_norm / k_norm that its forward never calls and that no released checkpoint has.
_BUILT_NEVER_READ = {"FalconH1ForCausalLM": (".q_norm.weight", ".k_norm.weight")}


def unread_parameters(model: torch.nn.Module) -> set[str]:
    """Parameters no update needs to write: nothing serves them (see ``_BUILT_NEVER_READ``)."""
    endings = _BUILT_NEVER_READ.get(type(model).__name__, ())
    return {name for name, _ in model.named_parameters() if name.endswith(endings)} if endings else set()


def optional_parameters(model: torch.nn.Module) -> set[str]:
    """Parameters a checkpoint may leave out, each created holding a value that says so: the KV-cache scales of a
    quantized attention (``k_scale``/``v_scale`` created as -1.0, read as "use 1.0" by its post-processing); and
    those nothing reads (``unread_parameters``)."""
    from sglang.srt.layers.quantization.kv_cache import BaseKVCacheMethod

    return unread_parameters(model) | {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quant_method", None), BaseKVCacheMethod)
        for key in module._parameters
    }


def post_process_module(module: torch.nn.Module, device: torch.device) -> None:
    """One module's quantization post-processing, as SGLang's disk loader runs it."""
    from sglang.srt.model_loader.loader import device_loading_context

    with device_loading_context(module, device):
        module.quant_method.process_weights_after_loading(module)


def post_process_model(model: torch.nn.Module, device: torch.device) -> None:
    """The post-load processing of SGLang's disk loader: quantization repacking, then model fix-ups."""
    from sglang.srt.model_loader.loader import DefaultModelLoader, post_load_weights

    DefaultModelLoader.postprocess_weights(model, device)
    post_load_weights(model)


def reloads_quantized_itself(model: torch.nn.Module) -> bool:
    """A model SGLang's ``--load-format flash_rl`` loader reloads with its own record of the pre-quantization layout."""
    return hasattr(model, "recorded_loader") or hasattr(model, "original_weights_rebuild_keys")


def post_process_unrecorded(model: torch.nn.Module, device: torch.device, recorded) -> None:
    """SGLang's post-load processing of every module outside ``recorded`` (the post-processed modules the plugin
    restores and post-processes itself)."""
    from sglang.srt.model_loader.loader import _modules_with_quant_method, device_loading_context

    for module, method in _modules_with_quant_method(model):
        if id(module) not in recorded:
            with device_loading_context(module, device):
                method.process_weights_after_loading(module)


@contextlib.contextmanager
def without_post_load_fixups(model: torch.nn.Module):
    """For a dry run: the model's ``post_load_weights`` (which ``load_weights`` calls at its end, e.g. DeepSeek's
    ``w_kc``/``w_vc`` derived from the served ``kv_b_proj``) does nothing. The caller holds the one-writer lock."""
    if not hasattr(model, "post_load_weights"):
        yield
        return
    saved = model.__dict__.get("post_load_weights")
    model.post_load_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if saved is None:
            model.__dict__.pop("post_load_weights", None)
        else:
            model.post_load_weights = saved


def model_dtype_context(updater):
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    return set_default_torch_dtype(updater.model_config.dtype)


# ---------------------------------------------------------------- trainer process (sglang_ckpt_plugin.trainer)
def trainer_process_group(backend: str, init_method: str, world_size: int, group_name: str, timeout_s: float):
    """Rank 0 of the group SGLang's ``/init_weights_update_group`` joins (same helper, same store prefix)."""
    import datetime

    from sglang.srt.utils.common import init_custom_process_group

    return init_custom_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=0,
        group_name=group_name,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


FLATTENED_BUCKET_FORMAT = "flattened_bucket"  # SGLang's load_format: tensors packed back to back, as uint8
