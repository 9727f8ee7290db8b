"""SGLang's own update paths, seen from the scheduler process: the trainer session
(``/begin_weight_update`` … ``/update_weights_from_distributed`` / ``_tensor`` … ``/end_weight_update``) and the
disk reload. Each call's outcome is agreed across TP ranks and recorded in the rank's weights state.

- Every trainer/tensor bucket is dry-run against the model before it is loaded (unknown names and wrong shapes
  are refused with nothing of that bucket written), as for our own pushes.
- What a session loaded counts when the session ends without a failure; a refused or failed bucket after loaded
  ones leaves a mix, so the weights are incomplete until those parameters are written again.
- Generation is held for the whole session on the HTTP side (routes.py), so no request sees a mix.
- A disk reload of a local safetensors checkpoint is dry-run from the files' headers first, the whole checkpoint
  in one ``load_weights`` call as SGLang's loader makes it: a checkpoint that would fail or corrupt the load (a
  wrong shape, a name the model raises on) is refused with SGLang's own ``(False, message)`` and nothing is
  written, where SGLang itself would load part of it, fail, "roll back" from the same files, fail again and take
  the server down. Nothing else is refused: tensors the model ignores are SGLang's business, a checkpoint that
  leaves parameters unwritten loads and the gate counts them missing, and where the dry run cannot measure the
  model's writes SGLang loads it unmeasured (every parameter counted written, as SGLang's own reload implies).
- Each load holds the one-writer lock (writer.py) for its whole duration, dry run included.
"""

from __future__ import annotations

import logging
import os

import torch

from ..loader.checkpoint import CheckpointError, read_checkpoint
from . import postprocessed, rank_state
from . import sglang_compat as sg
from .drafts import prefixed
from .validate import UpdateRejected, loader_extents, observe, validate_update
from .writer import exclusive

logger = logging.getLogger("sglang_ckpt_plugin")


def _written_member(updater) -> tuple[torch.nn.Module, str] | None:
    """(model, its prefix in the weights state) of the runner SGLang loads now: the target (prefix ``""``) or a draft
    that reads the target's checkpoint; None for a draft with a checkpoint of its own, to which SGLang hands the
    target's tensors or path: its business alone, not measured (the gate counts the target alone there)."""
    model = updater.get_model()
    models = rank_state.models(model)
    if model is models.target:
        return model, ""
    if any(draft.model is model for draft in models.counted_drafts):
        return model, models.prefix_of(model)
    return None


def _guarded_load(original, updater, source: str, *args, **kwargs):
    """Run one SGLang load call with every ``load_weights`` it makes dry-run first; agree; record. SGLang hands a
    draft model that reads the target's checkpoint the same tensors after the target: it is measured the same
    way, and what it ignores of them is allowed."""
    member = _written_member(updater)
    if member is None:
        return original(updater, *args, **kwargs)
    model, prefix = member
    weights = rank_state.state(model)
    rejection = []
    device = sg.runner_device(updater)
    in_session = postprocessed.session_of(model) is not None  # its end checks each quantized module is whole

    def check(manifest):
        try:
            return validate_update(
                model, manifest, partial=True, allow_unused=bool(prefix), whole_modules=not in_session
            )
        except UpdateRejected as exc:
            rejection.append(str(exc))
            raise

    def load_with(coverage, load):
        return postprocessed.load_restored(model, device, coverage, load)

    with observe(model, check, load_with) as seen:  # holds the one-writer lock
        try:
            ok, message = original(updater, *args, **kwargs)
        except Exception as exc:  # SGLang's tensor path lets load errors escape; never crash the scheduler
            ok, message = False, f"{type(exc).__name__}: {exc}"
    any_failed, any_touched, any_unknown = rank_state.agree(not ok, seen.touched, seen.touched and not seen.coverage)
    if not any_failed:
        weights.session_loaded(prefixed(prefix, seen.coverage))
        return True, message
    why = rejection[0] if rejection else (message if not ok else "another tensor-parallel rank failed (see its log)")
    if any_unknown:  # what it wrote is not known: all of this model (None: all of the target and its drafts)
        planned = rank_state.models(model).everything_of(model) if prefix else None
    else:
        planned = prefixed(prefix, seen.coverage)
    weights.session_bucket_failed(planned, any_touched, source, why)
    if weights.last_update is not None and weights.last_update.outcome == "incomplete":
        return False, f"update failed part-way (the weights are now incomplete until rewritten): {why}"
    return False, f"update rejected before any weight was changed: {why}"


def load_weights_from_distributed(original, updater, named_tensors):
    """AROUND the model runner's loader of received tensors (trainer path); returns SGLang's (success, message)."""
    return _guarded_load(original, updater, "trainer", named_tensors)


def update_weights_from_tensor(original, updater, named_tensors, load_format=None, **kwargs):
    """AROUND the model runner's ``update_weights_from_tensor`` (SGLang's tensor path)."""
    return _guarded_load(original, updater, "tensor", named_tensors, load_format, **kwargs)


def update_weights_from_disk(original, updater, model_path, load_format=None, *args, **kwargs):
    """AROUND the model runner's disk reload: the checkpoint's headers are dry-run first (a misfit is refused, the
    served weights untouched); a success writes what the dry run measured (every parameter, when it could not
    run); a failure after loading began (SGLang then reloads the same files) leaves the weights incomplete."""
    member = _written_member(updater)
    if member is None:
        return original(updater, model_path, load_format, *args, **kwargs)
    model, prefix = member
    models, weights = rank_state.models(model), rank_state.state(model)
    # a draft is reloaded after its target: whatever stops it leaves the draft behind the target it serves with
    lost = models.everything_of(model) if prefix else None
    with exclusive():
        coverage, error = None, None
        try:
            coverage = disk_checkpoint_coverage(model, model_path, load_format, kwargs.get("weight_name_filter"))
        except UpdateRejected as exc:
            error = str(exc)
        (any_refused,) = rank_state.agree(error is not None)
        if any_refused:
            why = error or "another tensor-parallel rank refused the checkpoint (see its log line)"
            if prefix:
                weights.failed_partway(lost, "disk", f"{model_path}: the draft model refused it: {why}")
                return False, f"update_weights_from_disk: the target loaded {model_path!r}, its draft refused: {why}"
            weights.rejected("disk", f"{model_path}: {why}")
            return False, f"update_weights_from_disk refused {model_path!r}, the served weights are unchanged: {why}"
        # SGLang loads, then post-processes every module: each quantized one must hold its loader-facing layout
        restored = postprocessed.Restored(model, list(postprocessed.layouts(model)), sg.runner_device(updater))
        with observe(model) as seen:
            try:
                ok, message = original(updater, model_path, load_format, *args, **kwargs)
            except BaseException:
                restored.abandon()
                raise
        if ok:
            try:
                restored.finish(post_process=False)
            except RuntimeError as exc:
                ok, message = False, f"{model_path}: {exc}"
        else:  # what SGLang wrote (and its "rollback" from the same files) is dropped: quantized modules as served
            restored.abandon()
        any_failed, any_touched = rank_state.agree(not ok, seen.touched)
    if not any_failed:
        weights.reloaded_from_disk(
            message, models.everything_of(model) if coverage is None else prefixed(prefix, coverage)
        )
    elif any_touched or prefix:
        weights.failed_partway(lost, "disk", message)
    else:
        weights.failed_untouched("disk", message)
    return ok and not any_failed, message


def disk_checkpoint_coverage(model, model_path: str, load_format, name_filter=None):
    """What SGLang's reload of ``model_path`` would write, from the safetensors headers SGLang's loader would read
    (the index's files, else every ``*.safetensors``); UpdateRejected when loading it would fail or corrupt the
    model. None when the files are not local safetensors (a hub name, .bin/.pt) or the model's writes cannot be
    measured: SGLang's loader is left to judge them."""
    fmt = str(getattr(load_format, "value", load_format) or "auto").lower()
    if fmt not in ("auto", "safetensors") or not os.path.isdir(model_path):
        return None
    try:
        tensors = read_checkpoint(model_path)
    except CheckpointError as exc:
        if fmt == "auto" and not any(name.endswith(".safetensors") for name in os.listdir(model_path)):
            return None  # .bin / .pt weights: SGLang falls back to them
        raise UpdateRejected(str(exc)) from None
    manifest = [(t.name, t.dtype, list(t.shape)) for t in tensors if name_filter is None or name_filter(t.name)]
    # SGLang's reload skips tensors a model ignores (e.g. MTP layers): unused tensors are allowed, as there; what
    # the checkpoint leaves unwritten is the gate's to count (partial), not a reason to refuse SGLang's load
    try:
        coverage = validate_update(model, manifest, partial=True, allow_unused=True)
    except UpdateRejected as exc:
        if exc.kind in ("misfit", "part-module"):
            raise
        logger.warning("update_weights_from_disk %s: loading it unmeasured (%s)", model_path, exc)
        return None
    written = set(postprocessed.modules_written(model, coverage))
    unwritten = [name for name in postprocessed.layouts(model) if name not in written]
    if unwritten:  # SGLang would post-process them again, on their post-processed bytes
        raise UpdateRejected(
            f"the checkpoint leaves {len(unwritten)} quantized module(s) unwritten ({', '.join(unwritten[:3])}), which "
            "SGLang's reload would post-process a second time; reload a checkpoint with every quantized weight"
        )
    return coverage


def begin_session(original, manager, recv_req, **kwargs):
    """AROUND the scheduler's ``begin_weight_update``: start counting what the session loads; the quantized
    modules its calls write are restored as they come and post-processed at its end (postprocessed.py)."""
    out = original(manager, recv_req, **kwargs)
    if out.success:
        models = rank_state.know_models(manager)
        rank_state.state(models.target).begin_session()
        device, _ = sg.scheduler_rank(manager)
        for member in (models.target, *(draft.model for draft in models.counted_drafts)):
            postprocessed.open_session(member, device)
    return out


def end_session(original, manager, recv_req, **kwargs):
    """AROUND the scheduler's ``end_weight_update``: a session with no failure counts what it loaded; one that wrote
    part of a quantized module (dropped, as served, by ``post_process_session``) failed part-way."""
    out = original(manager, recv_req, **kwargs)
    models = rank_state.know_models(manager)
    weights = rank_state.state(models.target)
    left = {}
    for member in (models.target, *(draft.model for draft in models.counted_drafts)):
        session = postprocessed.close_session(member)  # SGLang's end post-processed it, or there was nothing to
        if session is not None and session.partly:
            prefix = models.prefix_of(member)
            left.update({prefix + name: parts for name, parts in session.partly.items()})
    if weights.session is not None:
        if out.success and not left:
            weights.end_session("trainer")
        else:
            why = (
                f"end_weight_update failed: {out.message}"
                if not out.success
                else f"the session wrote part of {len(left)} quantized module(s), left as served: "
                + "; ".join(postprocessed.describe_partly(left)[:3])
            )
            # what the session loaded counts unwritten (a mix of versions), the modules left as served with it
            weights.session_bucket_failed(None if not out.success else {}, True, "trainer", why)
            weights.session = None
    return out


def post_process_session(original, model, target_device):
    """AROUND SGLang's ``DefaultModelLoader.postprocess_weights``: at the end of a trainer session that restored
    quantized modules, post-process those it wrote whole (once) and every unquantized module, never a quantized
    module it left as served (SGLang would process it a second time); otherwise SGLang's own."""
    session = postprocessed.session_of(model)
    if session is None:
        return original(model, target_device)
    session.end(loader_extents(model))
    modules = dict(model.named_modules())
    sg.post_process_unrecorded(model, target_device, {id(modules[n]) for n in postprocessed.layouts(model)})
    return None
