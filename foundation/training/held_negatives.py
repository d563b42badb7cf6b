"""The held batches of ``cross_dims_negatives`` in a checkpoint, one set per rank.

With ``cross_dims_negatives`` each rank keeps the detached (image, report) embeddings of its last
2D and last 3D batch and ranks the next batch of the other dimensionality against them. Under
DDP every rank holds its own. Lightning builds a checkpoint on every rank (``trainer.
save_checkpoint`` is collective) and rank 0 writes it, so the held batches of all ranks are
gathered into it; a resume on as many ranks hands each rank its own back, and draws the same
negatives as an uninterrupted run. The single-process entry (``HELD_NEGATIVES``: rank 0's) keeps
the format that checkpoints written before had.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from torch import Tensor

HELD_NEGATIVES = "cross_dims_negatives"  # rank 0's: {"2": [img, txt], "3": [img, txt]}
HELD_NEGATIVES_BY_RANK = "cross_dims_negatives_by_rank"  # every rank's, in rank order

Held = dict[int, tuple[Tensor, Tensor]]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_held(held: Held, checkpoint: dict[str, Any]) -> None:
    """Put this rank's ``held`` batches, and under a process group every rank's, in
    ``checkpoint``. Collective when several ranks run: call it on all of them."""
    mine = {str(d): [t.detach().cpu() for t in pair] for d, pair in held.items()}
    _, world = _rank_and_world()
    every: list[Any] = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
        checkpoint[HELD_NEGATIVES_BY_RANK] = every
    if every[0]:
        checkpoint[HELD_NEGATIVES] = every[0]


def load_held(checkpoint: dict[str, Any], *, resuming: bool = True) -> Held:
    """This rank's held batches from ``checkpoint`` (empty when it has none). Resumed on another
    number of ranks than it was written by, rank r takes rank ``r mod n``'s, with a warning
    (``resuming=False``, e.g. loading weights to evaluate or export: no warning)."""
    rank, world = _rank_and_world()
    by_rank = checkpoint.get(HELD_NEGATIVES_BY_RANK)
    if by_rank:
        written = len(by_rank)
        if written != world and resuming:
            warnings.warn(
                f"the checkpoint holds the cross-dimensionality negatives of {written} ranks and "
                f"this run has {world}: rank r resumes with those of rank r mod {written}, so "
                "the resume is not exact",
                stacklevel=2,
            )
        entry = by_rank[rank % written]
    else:
        entry = checkpoint.get(HELD_NEGATIVES) or {}
        if entry and world > 1 and resuming:
            warnings.warn(
                f"the checkpoint holds the cross-dimensionality negatives of one rank and this "
                f"run has {world}: every rank resumes with them, so the resume is not exact",
                stacklevel=2,
            )
    return {int(d): (img, txt) for d, (img, txt) in entry.items()}
