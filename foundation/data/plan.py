"""Which samples each rank and worker reads in an epoch: pure functions, no I/O.

Why: with DDP every rank must yield exactly the same number of batches or the job hangs at the
first collective after the shortest rank stops. Opt-outs change the number of samples per shard
at run time, so counts cannot be fixed when the shards are written. We plan from the manifest:
per shard, its samples minus those of excluded patients (the manifest lists patients per shard
with their sample counts), so the plan needs no shard to be opened.

The plan of one epoch (for one dims group; 2D and 3D are planned separately):
1. shuffle the shards by (seed, epoch, salt) and lay their *kept* samples end to end: this is the
   epoch's global order, indices ``0..N-1``; it does not depend on world size or workers;
2. optionally restrict it to ``remaining`` intervals (resume with another layout);
3. cut the sequence into ``world_size`` equal contiguous spans of whole batches, dropping the
   remainder (< world_size * batch_size samples) at the end;
4. cut each rank's span into per-worker spans of whole batches (``worker_batches``);
5. express each worker span as pieces ``(shard, first_kept_index, n_kept)``: a shard is split
   inside when there are fewer shards than ranks x workers.
The worker reads its pieces in order, counting kept samples (meta.json only for excluded ones).

Positions are "global intervals": ``[start, end)`` in the epoch's global order. Resume stores how
many batches each worker consumed; ``remaining_after`` turns that into the intervals still to
visit, which can be replanned for any new world size / worker count without repeat or loss.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Interval = tuple[int, int]  # [start, end) in the epoch's global kept order
ShardCounts = tuple[str, dict[str, int]]  # (shard name, {patient: samples})


@dataclass(frozen=True)
class Piece:
    """``count`` kept samples of ``shard`` starting at its ``first``-th kept sample."""

    shard: str
    first: int
    count: int


@dataclass(frozen=True)
class EpochPlan:
    """Spans of one epoch for every (rank, worker); all sizes in samples."""

    order: tuple[tuple[str, int], ...]  # shuffled (shard, kept samples)
    batch_size: int
    batches_per_rank: int
    worker_batches: tuple[int, ...]  # batches per worker, identical on every rank
    spans: tuple[tuple[tuple[Interval, ...], ...], ...]  # [rank][worker] -> global intervals
    dropped: int  # samples of the remaining order left out (remainder, cap)

    @property
    def world_size(self) -> int:
        return len(self.spans)

    @property
    def num_workers(self) -> int:
        return len(self.worker_batches)

    @property
    def samples_per_rank(self) -> int:
        return self.batches_per_rank * self.batch_size

    def pieces(self, rank: int, worker: int) -> list[Piece]:
        """What ``(rank, worker)`` reads, in order."""
        return to_pieces(self.order, self.spans[rank][worker])


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng([int(s) & 0xFFFFFFFF for s in seed])


def shard_order(
    shards: Iterable[ShardCounts], excluded: frozenset[str], *, seed: int, epoch: int, salt: int = 0
) -> list[tuple[str, int]]:
    """Shards in this epoch's shuffled order with their kept sample counts (independent of the
    order the shards are listed in)."""
    kept = sorted(
        (name, sum(n for p, n in patients.items() if p not in excluded))
        for name, patients in shards
    )
    perm = _rng(seed, epoch, salt).permutation(len(kept))
    return [kept[i] for i in perm]


def total(intervals: Iterable[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def take(intervals: Sequence[Interval], start: int, length: int) -> list[Interval]:
    """Global intervals of positions ``[start, start+length)`` of the concatenated intervals."""
    out: list[Interval] = []
    pos = 0
    for a, b in intervals:
        n = b - a
        lo, hi = max(start - pos, 0), min(start + length - pos, n)
        if lo < hi:
            out.append((a + lo, a + hi))
        pos += n
        if pos >= start + length:
            break
    return out


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted union of intervals (adjacent ones joined)."""
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def to_pieces(order: Sequence[tuple[str, int]], intervals: Sequence[Interval]) -> list[Piece]:
    """Map global intervals onto (shard, first kept index, count) pieces."""
    starts = np.cumsum([0] + [n for _, n in order]).tolist()
    pieces: list[Piece] = []
    for a, b in intervals:
        i = bisect.bisect_right(starts, a) - 1
        while a < b:
            while order[i][1] == 0 or starts[i + 1] <= a:  # skip emptied shards
                i += 1
            end = min(b, starts[i + 1])
            pieces.append(Piece(order[i][0], a - starts[i], end - a))
            a = end
    return pieces


def advance(pieces: Sequence[Piece], n: int) -> list[Piece]:
    """The pieces left after skipping their first ``n`` samples."""
    out: list[Piece] = []
    for p in pieces:
        if n >= p.count:
            n -= p.count
            continue
        out.append(Piece(p.shard, p.first + n, p.count - n))
        n = 0
    return out


def even_worker_batches(batches: int, num_workers: int) -> list[int]:
    """How a DataLoader shares batches out: round robin, the first workers get one more."""
    nw = max(1, num_workers)
    return [batches // nw + (1 if j < batches % nw else 0) for j in range(nw)]


def plan_epoch(
    shards: Sequence[ShardCounts],
    excluded: frozenset[str],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool = True,
    remaining: Sequence[Interval] | None = None,
    worker_batches: Sequence[int] | None = None,
    max_batches: int | None = None,
    salt: int = 0,
) -> EpochPlan:
    """Plan one epoch (see the module docstring).

    ``remaining``: only these global intervals (resume); ``worker_batches``: batches of each
    worker (default: round robin); ``max_batches``: cap on batches per rank. With
    ``drop_last=False`` the remainder goes to the last ranks as one partial batch each, so ranks
    may differ by one batch: use it only for single-process evaluation.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be positive")
    order = shard_order(shards, excluded, seed=seed, epoch=epoch, salt=salt)
    n_total = sum(n for _, n in order)
    remaining = [(0, n_total)] if remaining is None else merge(remaining)
    m = total(remaining)
    nw = max(1, num_workers)
    if drop_last:
        nb = m // (world_size * batch_size)
        if max_batches is not None:
            nb = min(nb, max_batches)
        rank_sizes = [nb * batch_size] * world_size
    else:
        if worker_batches is not None or max_batches is not None:
            raise ValueError("drop_last=False plans cannot fix worker_batches or max_batches")
        rank_sizes = [m // world_size + (1 if r < m % world_size else 0) for r in range(world_size)]
        nb = -(-rank_sizes[0] // batch_size)
    wb = list(worker_batches) if worker_batches is not None else even_worker_batches(nb, nw)
    if len(wb) != nw or sum(wb) != nb:
        raise ValueError(f"worker_batches {wb} must give {nb} batches over {nw} workers")
    spans = []
    start = 0
    for size in rank_sizes:
        rank_spans = []
        offset = 0
        for c in wb:
            n = min(c * batch_size, size - offset)  # only the last may be short (drop_last=False)
            rank_spans.append(tuple(take(remaining, start + offset, n)))
            offset += n
        spans.append(tuple(rank_spans))
        start += size
    return EpochPlan(
        order=tuple(order),
        batch_size=batch_size,
        batches_per_rank=nb,
        worker_batches=tuple(wb),
        spans=tuple(spans),
        dropped=m - sum(rank_sizes),
    )


def remaining_after(
    plan: EpochPlan,
    consumed: Sequence[int],
    *,
    block_size: int | None = None,
    permutation: Callable[[int, int, int, int], Sequence[int]] | None = None,
) -> list[Interval]:
    """Global intervals not yet visited when worker ``j`` of every rank consumed ``consumed[j]``
    samples (ranks advance in lockstep under DDP). The dropped remainder is not included.

    Workers read their span in blocks of ``block_size`` visited in the order
    ``permutation(rank, worker, block_index, block_len)``: a partly consumed block leaves holes,
    not a prefix. Without them, a span is consumed as a prefix."""
    left: list[Interval] = []
    for rank, rank_spans in enumerate(plan.spans):
        for worker, (span, done) in enumerate(zip(rank_spans, consumed, strict=True)):
            n = total(span)
            size = block_size or max(n, 1)
            full = done // size * size  # whole blocks consumed
            part = done - full
            seen: set[int] = set()
            if part:
                m = min(size, n - full)
                order = permutation(rank, worker, full // size, m) if permutation else range(m)
                seen = {full + int(i) for i in list(order)[:part]}
            offsets = [o for o in range(full, min(full + size, n)) if o not in seen]
            runs = [(o, o + 1) for o in offsets] + [(min(full + size, n), n)]
            for a, b in merge(runs):
                left.extend(take(span, a, b - a))
    return merge(left)


# ---- 2D/3D interleaving: one schedule of batch dims, identical on every rank -----------------


def batch_schedule(n2: int, n3: int, *, seed: int, epoch: int) -> tuple[int, ...]:
    """Dims of each step (2 or 3): a seeded shuffle of ``n2`` 2D and ``n3`` 3D batches.

    Every rank computes the same schedule, so all ranks run the same dims at the same step
    (same graph and parameters under DDP)."""
    steps = np.array([2] * n2 + [3] * n3, dtype=np.int64)
    return tuple(int(d) for d in _rng(seed, epoch, 23).permutation(steps))


def cap_by_ratio(n2: int, n3: int, ratio_3d: float | None) -> tuple[int, int]:
    """Batch counts giving a fraction ``ratio_3d`` of 3D batches (the scarcer kind is used in
    full, the other truncated); ``None`` keeps every batch of both, and so does a split that
    holds only one kind (nothing to balance: a CT-only dataset must not train on nothing)."""
    if ratio_3d is not None and not 0.0 <= ratio_3d <= 1.0:
        raise ValueError("ratio_3d must be within [0, 1]")
    if ratio_3d is None or n2 == 0 or n3 == 0:
        return n2, n3
    if ratio_3d == 0.0:
        return n2, 0
    if ratio_3d == 1.0:
        return 0, n3
    want3 = int(n2 * ratio_3d / (1.0 - ratio_3d))
    if n3 > want3:
        return n2, want3
    return min(n2, int(n3 * (1.0 - ratio_3d) / ratio_3d)), n3


def worker_dims_counts(
    schedule: Sequence[int], num_workers: int, steps: int | None = None
) -> list[dict[int, int]]:
    """Per worker, how many batches of each dims it serves among the first ``steps`` steps
    (all steps if None). The DataLoader hands step ``t`` to worker ``t % num_workers``."""
    nw = max(1, num_workers)
    counts = [{2: 0, 3: 0} for _ in range(nw)]
    for t, d in enumerate(schedule[: len(schedule) if steps is None else steps]):
        counts[t % nw][d] += 1
    return counts
