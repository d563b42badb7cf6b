"""Epoch state and resume bookkeeping of the training stream.

The whole position of a stream is "steps consumed by this rank in epoch e" plus what the epoch
was planned over (layout, remaining intervals, exclusion list version): every random choice is
a pure function of (seed, epoch, position or key), see ``foundation.data.stream``. This module
holds the epoch state sent to workers, its checkpoint form, and where a resumed epoch starts:
the same step with the same layout, else the intervals no rank visited replanned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundation.data.plan import EpochPlan, remaining_after, worker_dims_counts
from foundation.shards.manifest import Manifest

log = logging.getLogger(__name__)
STATE_FORMAT = 1
Base = dict[int, list[tuple[int, int]] | None]  # remaining intervals per dims (None: all)
PlansFn = Callable[[dict[str, Any], Base], tuple[dict[int, EpochPlan | None], tuple[int, ...]]]


@dataclass
class EpochState:
    """What every worker needs for one epoch (pickled into the workers)."""

    epoch: int
    plans: dict[int, EpochPlan | None]
    schedule: tuple[int, ...]  # dims of each step, same on every rank
    start_steps: int  # steps already consumed when this epoch (segment) starts
    layout: dict[str, Any]
    base: Base  # remaining intervals planned over (resume)
    drop: frozenset[str]  # excluded patients of this manifest + patients of the other split
    exclusion_version: str | None
    started: bool = False


def state_to_dict(
    st: EpochState | None, steps: int, epoch: int, manifest: Manifest, seed: int
) -> dict[str, Any]:
    """The checkpoint form of a position: ``steps`` consumed in ``st`` (None: ``epoch`` not
    prepared yet, a fresh start)."""
    if st is None:
        return {"format": STATE_FORMAT, "epoch": epoch, "steps": 0, "fresh": True}
    return {
        "format": STATE_FORMAT,
        "dataset": manifest.dataset,
        "manifest_version": manifest.version,
        "seed": seed,
        "epoch": st.epoch,
        "steps": steps,
        "finished": steps >= len(st.schedule),
        "layout": dict(st.layout),
        "base": {str(d): v for d, v in st.base.items()},
        "exclusion_version": st.exclusion_version,
    }


def state_from_dict(
    state: dict[str, Any], manifest: Manifest, seed: int
) -> tuple[int, dict[str, Any] | None]:
    """Check ``state`` against this stream: the epoch to prepare next and the resume point
    within it (None: from its start)."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unsupported stream state format {state.get('format')!r}")
    if state.get("fresh"):
        return state["epoch"], None
    for k, mine in (("dataset", manifest.dataset), ("seed", seed)):
        if state[k] != mine:
            raise ValueError(f"stream state is for {k}={state[k]!r}, this stream has {mine!r}")
    if state["manifest_version"] != manifest.version:
        raise ValueError(
            f"stream state is for manifest version {state['manifest_version']},"
            f" this stream reads version {manifest.version}"
        )
    if state["finished"]:
        return state["epoch"] + 1, None
    resume = dict(state)
    resume["base"] = {
        d: None if v is None else [tuple(i) for i in v] for d, v in state["base"].items()
    }
    return state["epoch"], resume


def resume_point(
    resume: dict[str, Any],
    layout: dict[str, Any],
    version: str | None,
    plans: PlansFn,
    block_size: int | None,
    permutation: Callable[[int, Any], Callable[[int, int, int, int], np.ndarray]],
) -> tuple[Base, int]:
    """Where a resumed epoch starts under ``layout``: (intervals to plan over, steps done).

    Same layout (rank aside): the checkpoint's step. Another one: the intervals no rank has
    visited yet under the old layout, from step 0. ``plans(layout, base)`` plans the epoch,
    ``permutation(dims, base)`` is its block order (see ``block_permutation``)."""
    base: Base = {int(d): v for d, v in resume["base"].items()}
    if resume["exclusion_version"] != version:
        log.warning("exclusion list changed since the checkpoint: positions reinterpreted")
    old = resume["layout"]
    same = {k: v for k, v in old.items() if k != "rank"} == {
        k: v for k, v in layout.items() if k != "rank"
    }
    if same:
        return base, resume["steps"]
    # replan what no rank has visited yet under the new layout
    old_plans, schedule = plans(old, base)
    done = worker_dims_counts(schedule, old["num_workers"], resume["steps"])
    return {
        d: None
        if p is None
        else remaining_after(
            p,
            [c[d] * old[f"volumes_{d}d"] for c in done],
            block_size=block_size,
            permutation=permutation(d, base[d]),
        )
        for d, p in old_plans.items()
    }, 0
