"""A server with data-parallel replicas (``--dp N``): one report per replica, read by the HTTP process as one.

SGLang's internal-state request is answered by each replica's TP rank 0, in no fixed order. Every replica takes
every update (SGLang's communicator fans each update request out to all of them), but each loads on its own: a
replica can refuse or fail where another succeeded. The server then holds replicas with different weights and
must not serve either: ``divergence`` keeps the gate shut from such an outcome until an update has written the
whole model on every replica again. Pure functions of the reports, so that the rules are tested without a
server.
"""

from __future__ import annotations


def by_replica(reports: list[dict]) -> list[dict]:
    """The reports in replica order (a report without a placement, from an older plugin, sorts first)."""
    return sorted(reports, key=lambda r: (r.get("placement") or {}).get("replica") or 0)


def merged_placement(reports: list[dict]) -> dict:
    """Where every rank of every replica runs: ``rank_keys`` replica by replica, stage by stage (the order loaders
    feed them in), ``ranks`` each key with its replica, pipeline stage and TP rank. Peer access is published for one
    replica only: a loader process feeds the GPUs of one TP group from one GPU, never two replicas' (their GPUs are
    not known to read each other's memory)."""
    placements = [r.get("placement") or {} for r in by_replica(reports)]
    ranks, seen = [], set()
    for p in placements:
        keys = p.get("rank_keys") or []
        per_stage = max(1, len(keys) // int(p.get("pp_size") or 1))
        for i, key in enumerate(keys):
            if key not in seen:  # under DP attention every attention group's leader reports the one TP group
                seen.add(key)
                ranks.append(
                    {"replica": p.get("replica"), "pp_rank": i // per_stage, "tp_rank": i % per_stage, "key": key}
                )
    return {
        "device": placements[0].get("device") if placements else None,
        "rank_keys": [r["key"] for r in ranks],
        "ranks": ranks,
        "peer_access": len({p.get("replica") for p in placements}) == 1 and bool(placements[0].get("peer_access")),
    }


def divergence(outcomes: list[bool], reports: list[dict], previous: str | None, why: str = "") -> str | None:
    """Why the replicas may hold different weights after an update call (None: they hold the same).
    ``outcomes``: each replica's success in that call; ``reports``: their states read after it. Some replicas
    succeeding where others did not makes them diverge; a call that succeeded on every replica and wrote the whole
    model on each makes them agree again; anything else leaves ``previous``."""
    if len(outcomes) < 2:
        return previous
    if all(outcomes):
        whole = all((r.get("last_update") or {}).get("covers_model") for r in reports)
        return None if whole and len(reports) == len(outcomes) else previous
    if not any(outcomes):
        return previous
    behind = sum(1 for ok in outcomes if not ok)
    return (
        f"{behind} of {len(outcomes)} data-parallel replicas did not take the last update, which the others "
        f"loaded{f' ({why[:300]})' if why else ''}: the replicas hold different weights until an update of the "
        "whole model succeeds on every replica"
    )
