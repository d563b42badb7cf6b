"""The worker-side stages of the training stream, each a generator over the one before.

    read_piece      tar members -> exclusion filter -> the piece's window -> decode
    pad_shortfall   keep the planned sample count when data is corrupt (DDP-safe)
    block_shuffle   a seeded permutation per block of samples, resumable mid-block
    augment         the MONAI transform, seeded per (seed, epoch, key): a volume -> its crops
    collate         crops -> the training batch dict (+ tokenized reports)

Every random choice is a pure function of (seed, epoch, position or key), so a resumed worker
recomputes what it would have yielded (see ``foundation.data.stream``). ``stats`` is the
stream's per-process counter (excluded, unlisted, corrupt, padded), updated in place.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from foundation.data.exclusion_filter import exclusion_filter
from foundation.data.plan import Piece, advance
from foundation.sample import MODALITIES
from foundation.shards.npy_slab import open_volume
from foundation.shards.reader import ShardReadError, decode_report, iter_shard, load_image

log = logging.getLogger(__name__)
Transform = Callable[[np.ndarray, dict], "torch.Tensor | list[torch.Tensor]"]
Tokenize = Callable[[list[str]], Any]
OnError = Literal["skip", "raise"]


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed that is a pure function of ``parts``."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def read_piece(
    piece: Piece,
    url: str,
    drop: frozenset[str],
    listed: dict[str, int] | None,
    box_dims: tuple[int, ...],
    on_error: OnError,
    stats: Counter[str],
) -> Iterator[dict[str, Any]]:
    """Decoded kept samples of one piece; on a read error, skipped and counted (or raised).

    ``box_dims``: dims whose transform reads crop boxes itself, so only the header is read
    here (the crop later); ``listed``: see ``exclusion_filter``."""
    raw = iter_shard(url)
    try:
        kept = exclusion_filter(raw, piece.shard, drop, listed, stats)
        for s in itertools.islice(kept, piece.first, piece.first + piece.count):
            # header only (the crop is read by the transform) where it can, else the array
            boxes = s["meta"].get("dims") in box_dims
            volume = open_volume(s, piece.shard, box_dims) if boxes else None
            yield {
                "key": s["__key__"],
                "image": load_image(s, piece.shard) if volume is None else volume,
                "meta": s["meta"],
                "report": decode_report(s),
            }
    except ShardReadError as e:
        if on_error == "raise":
            raise
        stats["corrupt"] += 1
        log.warning("skipping the rest of a piece: %s", e)
    finally:
        raw.close()


def pad_shortfall(
    pieces: list[Piece],
    read: Callable[[Piece], Iterator[dict[str, Any]]],
    stats: Counter[str],
) -> Iterator[dict[str, Any]]:
    """Exactly the planned number of samples of ``pieces`` (each read by ``read``): a shortfall
    (corrupt data) is filled with repeats of the last good sample, so every rank still yields
    the planned batches."""
    last, owed = None, 0
    for piece in pieces:
        got = 0
        for sample in read(piece):
            got += 1
            for _ in range(owed + 1):
                yield sample
            last, owed = sample, 0
        owed += piece.count - got
        stats["padded"] += piece.count - got
        if last is not None and owed:
            yield from itertools.repeat(last, owed)
            owed = 0
    if owed:
        raise RuntimeError(
            f"no readable sample in shards {sorted({p.shard for p in pieces})} of this worker"
        )


def block_permutation(
    seed: int, shuffle: bool, epoch: int, dims: int, base: Any
) -> Callable[[int, int, int, int], np.ndarray]:
    """The visiting order of block ``b`` of (rank, worker): a pure function of its position,
    so resume (and ``remaining_after``) can recompute it. ``base``: the remaining intervals
    the epoch was planned over (None: all)."""
    base_key = tuple(map(tuple, base or ()))

    def permutation(rank: int, worker: int, block: int, m: int) -> np.ndarray:
        if not shuffle:
            return np.arange(m)
        key = derive_seed(seed, epoch, dims, rank, worker, base_key, block)
        return np.random.default_rng(key).permutation(m)

    return permutation


def block_shuffle(
    pieces: list[Piece],
    skip: int,
    size: int | None,
    permutation: Callable[[int, int], np.ndarray],
    volumes: Callable[[list[Piece]], Iterator[dict[str, Any]]],
) -> Iterator[dict[str, Any]]:
    """Blocks of ``size`` samples (None: one block, no shuffle), each visited in
    ``permutation(block, len)`` order: skipping ``skip`` samples (resume) re-reads only the
    block it falls in. ``volumes(pieces)`` yields the samples of ``pieces`` in order."""
    n = sum(p.count for p in pieces)
    size = max(n, 1) if size is None else size
    first = skip // size
    samples = volumes(advance(pieces, first * size))
    for b in range(first, -(-n // size)):
        block = list(itertools.islice(samples, min(size, n - b * size)))  # (m,) samples
        start = skip - b * size if b == first else 0
        for i in permutation(b, len(block))[start:]:
            yield block[i]


def augment(
    samples: Iterator[dict],
    transform: Transform,
    dims: int,
    seed: int,
    epoch: int,
    on_error: OnError,
    stats: Counter[str],
) -> Iterator[list[dict]]:
    """MONAI transform, seeded per (seed, epoch, key): a volume gives its crops.

    A transform that reads crop boxes may meet a read error after the header was read
    cleanly (a shard cut or an I/O error meanwhile): the sample is skipped and counted as
    corrupt, and its place taken by the last good sample's crops (the next good one's when
    none came yet), so the worker still yields its planned batches (see ``pad_shortfall``)."""
    last, owed = None, 0
    for s in samples:
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(derive_seed(seed, epoch, s["key"]) % 2**32)
        try:
            out = transform(s["image"], s["meta"])
        except ShardReadError as e:
            if on_error == "raise":
                raise
            stats["corrupt"] += 1
            stats["padded"] += 1
            log.warning("skipping a sample: %s", e)
            if last is None:
                owed += 1
            else:
                yield last
            continue
        crops = [out] if isinstance(out, torch.Tensor) else list(out)
        group = [
            {"image": c, "key": s["key"], "meta": s["meta"], "report": s["report"]} for c in crops
        ]
        for _ in range(owed + 1):
            yield group
        last, owed = group, 0
    if owed:
        raise RuntimeError(f"no readable {dims}D sample among this worker's samples")


def collate(crops: list[dict], tokenize: Tokenize | None) -> dict[str, Any]:
    """Crops -> the training batch dict (contract in docs/data_contracts.md)."""
    batch: dict[str, Any] = {
        "image": torch.stack([c["image"] for c in crops]),  # (B, C, *spatial)
        "modality": torch.tensor([MODALITIES.index(c["meta"]["modality"]) for c in crops]),
        "key": [c["key"] for c in crops],
        "patient": [c["meta"]["patient"] for c in crops],
    }
    if tokenize is not None:
        tok = tokenize([c["report"] for c in crops])
        batch["input_ids"] = torch.as_tensor(tok["input_ids"], dtype=torch.long)
        batch["attention_mask"] = torch.as_tensor(tok["attention_mask"], dtype=torch.long)
    return batch
