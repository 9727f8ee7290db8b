"""Pipeline stages (``--pp-size N``): every stage handles a weight request at the same point of its loop.

SGLang hands each request from stage to stage: stage k handles it, then relays it to stage k + 1, and the first
stage answers the HTTP process. A weight update cannot run that way: one loader feeds every stage's ranks at
once, every rank must agree on one outcome (a model updated on one stage and not another is a mix), and the
first stage must report the whole model. So on a stage that relays, the plugin's weight requests (every update
path and the internal-state request that carries our report) are held until this stage has relayed them, then
handled; the last stage handles them as they arrive. Every rank of every stage then meets the others in the
same collectives (``rank_state.agree`` over the replica's world group), and the first stage answers for all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from ..transport.strings import all_gather_str
from . import sglang_compat as sg
from .weights_state import MISSING_LISTED


@dataclass
class _Held:
    request: object
    handle: Callable[[], object]  # runs the hook; returns the control output to answer with


_held: list[_Held] = []  # the scheduler thread's requests waiting for their relay (only that thread touches it)


def relays_to_next_stage() -> bool:
    stage, stages = sg.pipeline_stage()
    return stage < stages - 1


def at_every_stage_together(hook):
    """An AROUND hook ``hook(original, owner, recv_req, ...)`` of a scheduler-side request handler, run on a stage
    that relays only once the request went on to the next stage (the dispatcher answers nothing meanwhile)."""

    @functools.wraps(hook)
    def wrapper(original, owner, recv_req, *args, **kwargs):
        if not relays_to_next_stage():
            return hook(original, owner, recv_req, *args, **kwargs)
        _held.append(_Held(recv_req, lambda: hook(original, owner, recv_req, *args, **kwargs)))
        return None

    return wrapper


def after_relay(result, scheduler, data=None, *args, **kwargs):
    """AFTER hook of the scheduler's send to the next stage: handle the held requests it just relayed, in order,
    and answer each as the dispatcher would have."""
    relayed = [h for h in _held if data and any(req is h.request for req in data)]
    for held in relayed:
        _held.remove(held)
        output = held.handle()
        if output is not None:
            sg.send_control_output(scheduler, output, held.request)
    return result


def whole_model_report(report: dict) -> dict:
    """This rank's report, merged with every other stage's (a collective over the replica's world group; every
    rank calls it at the same point). Without pipeline stages: ``report`` itself."""
    stages, group = sg.pipeline_stage()[1], sg.model_cpu_group()
    if stages < 2 or group is None:
        return report
    texts = all_gather_str(json.dumps(report), group, dist.get_world_size(group))
    return merge_stage_reports([json.loads(t) for t in texts], stages)


def merge_stage_reports(reports: list[dict], stages: int) -> dict:
    """One report for the whole model from every rank's, in world-rank order (stage by stage; within a stage every
    TP rank recorded the same outcome, so each stage's first rank speaks for it). Complete when every stage is;
    the fingerprint only where every stage holds the same verified update; ``last_update.covers_model`` only where
    it wrote the whole of every stage."""
    per_stage = len(reports) // stages
    leaders = reports[::per_stage]
    states = [r.get("state") for r in leaders]
    state = (
        "complete" if all(s == "complete" for s in states) else "incomplete" if "incomplete" in states else "waiting"
    )
    missing = [name for r in leaders for name in r.get("missing") or []]
    fingerprints = {r.get("fingerprint") for r in leaders}
    merged = dict(leaders[0])
    merged.update(
        state=state,
        missing=missing[:MISSING_LISTED],
        missing_count=sum(int(r.get("missing_count") or 0) for r in leaders),
        fingerprint=fingerprints.pop() if len(fingerprints) == 1 and state == "complete" else None,
        session_open=any(r.get("session_open") for r in leaders),
    )
    if merged.get("last_update"):
        covers = all((r.get("last_update") or {}).get("covers_model") for r in leaders)
        merged["last_update"] = {**merged["last_update"], "covers_model": covers}
    return merged
