"""The training stream: shards -> plan -> this worker's pieces -> exclusion filter -> decode ->
deterministic shuffle -> augment -> tokenize -> batch.

Stages of one worker, for each dims group (2D and 3D are planned and read separately; batches
are homogeneous in dims and interleaved by a seeded schedule shared by all ranks)::

    pieces   = plan.pieces(rank, worker)                 # pure: manifest counts - exclusions
    raw      = iter_shard(url)                           # tar members; local images read lazily
    kept     = exclusion_filter(raw)                     # reads meta.json only, no image read;
                                                         # drops patients the manifest does
                                                         # not list for the shard, too
    window   = islice(kept, piece.first, piece.end)      # the kept samples this piece owns
    volumes  = decode(window)                            # img.npy -> array, or a volume read
                                                         # by crop boxes; corrupt -> skipped
    volumes  = pad_shortfall(volumes)                    # keep the planned count (DDP-safe)
    volumes  = block_shuffle(volumes)                    # seeded permutation per block
    crops    = augment(volumes)                          # MONAI, seeded per (seed, epoch, key);
                                                         # a crop box unreadable -> skipped,
                                                         # the last good crops repeated
    batches  = collate(crops) + tokenize(reports)

Exact resume: every random choice is a pure function of (seed, epoch, position or key), never of
a stateful buffer, so the position "steps consumed by this rank" is the whole state. With the
same world size and workers the resumed run yields exactly what the uninterrupted one would
have; with another layout the global intervals not yet visited are replanned (no repeat, no
loss, a different order). Steps are counted in the process that consumes the batches:
``consumed(n)`` (the data module does it) or automatically when iterated without workers.

The exclusion list is (re)loaded in the main process at each epoch start (``set_epoch`` or the
first iteration of ``EpochLoader``), so every worker plans and filters with the same list (one
version per epoch). Workers receive only the excluded patients the manifest holds (the list's
intersection with the manifest's patients, usually a few hundred, not the 1M-entry list: no
per-worker copy or pickling of it), and their filter also drops any sample whose patient the
manifest does not list for that shard, so a patient missing from the manifest cannot slip
past the smaller set. Use ``EpochLoader`` (``persistent_workers`` must stay off: workers
receive the epoch's plan anew).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundation.data.plan import (
    EpochPlan,
    Piece,
    advance,
    batch_schedule,
    cap_by_ratio,
    plan_epoch,
    remaining_after,
    worker_dims_counts,
)
from foundation.sample import MODALITIES
from foundation.shards.manifest import Manifest
from foundation.shards.npy_slab import open_volume
from foundation.shards.reader import (
    ShardReadError,
    decode_meta,
    decode_report,
    iter_shard,
    load_image,
)

log = logging.getLogger(__name__)
STATE_FORMAT = 1
Transform = Callable[[np.ndarray, dict], "torch.Tensor | list[torch.Tensor]"]
Tokenize = Callable[[list[str]], Any]


def as_tensor(image: np.ndarray, meta: dict) -> list[torch.Tensor]:
    """Default transform: the stored array as float32 ``(1, *S)`` (tests, fixed-size data)."""
    return [torch.from_numpy(np.asarray(image, dtype=np.float32))[None]]


def in_val_split(patient: str, fraction: float) -> bool:
    """Patient-level split: a stable hash of the pseudonym below ``fraction`` -> validation."""
    h = int.from_bytes(hashlib.sha256(f"val-split:{patient}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def manifest_key_ids(manifest: Any) -> set[str]:
    """Key fingerprints of a dataset (several for one merged from several centres)."""
    from foundation.governance.merge import manifest_key_ids as ids

    return set(ids(manifest))


def _load_exclusion_list(path: str) -> Any:
    from foundation.privacy.exclusion import ExclusionList  # another module of the project

    return ExclusionList.load(path)


@dataclass
class _Epoch:
    """What every worker needs for one epoch (pickled into the workers)."""

    epoch: int
    plans: dict[int, EpochPlan | None]
    schedule: tuple[int, ...]  # dims of each step, same on every rank
    start_steps: int  # steps already consumed when this epoch (segment) starts
    layout: dict[str, Any]
    base: dict[int, list[tuple[int, int]] | None]  # remaining intervals planned over (resume)
    drop: frozenset[str]  # excluded patients of this manifest + patients of the other split
    exclusion_version: str | None
    started: bool = False


class ShardStream(IterableDataset):
    """Batches (dicts, see the module docstring) streamed from a manifest's shards."""

    def __init__(
        self,
        manifest: Manifest | str | Path,
        exclusion: str | Path | None = None,
        *,
        transform_2d: Transform | None = None,
        transform_3d: Transform | None = None,
        tokenize: Tokenize | None = None,
        seed: int = 0,
        batch_size: int = 8,
        crops_per_volume: int = 1,
        ratio_3d: float | None = None,
        shuffle: bool = True,
        shuffle_block: int = 16,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        split: Literal["all", "train", "val"] = "all",
        val_fraction: float = 0.0,
        on_error: Literal["skip", "raise"] = "skip",
        shard_url: str | None = None,
        exclusion_loader: Callable[[str], Any] | None = None,
        count_yielded: bool = True,
    ) -> None:
        super().__init__()
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        if self.manifest.revoked_by is not None:
            raise ValueError(
                f"{self.manifest.location}: manifest version {self.manifest.version} was revoked;"
                f" use version {self.manifest.revoked_by}"
            )
        if batch_size % crops_per_volume:
            raise ValueError("batch_size must be a multiple of crops_per_volume")
        if on_error not in ("skip", "raise"):
            raise ValueError("on_error must be 'skip' or 'raise'")
        self.exclusion = None if exclusion is None else str(exclusion)
        self.exclusion_loader = exclusion_loader or _load_exclusion_list
        self.transforms = {2: transform_2d or as_tensor, 3: transform_3d or as_tensor}
        # dims whose transform reads crop boxes itself: local images stay unread until then
        self._box_dims = tuple(
            d for d, t in self.transforms.items() if getattr(t, "reads_boxes", False)
        )
        self.tokenize = tokenize
        self.seed, self.batch_size, self.crops = seed, batch_size, crops_per_volume
        self.ratio_3d, self.shuffle, self.shuffle_block = ratio_3d, shuffle, shuffle_block
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.on_error, self.shard_url, self.count_yielded = on_error, shard_url, count_yielded
        self.epoch = 0
        self._state: _Epoch | None = None
        self._resume: dict[str, Any] | None = None
        self._steps = 0
        self._loader_began = False
        self.stats: Counter[str] = Counter()  # per process: excluded, corrupt, padded
        # Shards by dims (each shard holds one dims: see ShardWriter).
        self._shards: dict[int, list[tuple[str, dict[str, int]]]] = {2: [], 3: []}
        for rec in self.manifest.shards:
            try:
                self._shards[rec.dim].append((rec.path, rec.patients))
            except ValueError as e:
                raise ValueError(f"{self.manifest.location}: {e}") from None
        # Where every shard lists its patients with their sample counts (what ShardWriter
        # records), the workers need only the excluded patients among them (see the docstring).
        complete = all(sum(r.patients.values()) == r.samples for r in self.manifest.shards)
        self._listed: dict[str, dict[str, int]] | None = (
            {r.path: r.patients for r in self.manifest.shards} if complete else None
        )
        self._patients = frozenset(self.manifest.patients()) if complete else None
        self._split_drop = frozenset(
            p
            for p in self.manifest.patients()
            if split != "all" and in_val_split(p, val_fraction) == (split == "train")
        )
        if shard_url is None:
            missing = [p for p in self.manifest.shard_paths() if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{missing[0]}: shard listed in {self.manifest.location} is missing"
                    f" ({len(missing)} missing in all)"
                )

    # ---- epoch set-up (main process) ----------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        if self.rank is None or self.world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        else:
            rank, world = self.rank, self.world_size
        return {
            "rank": rank,
            "world_size": world,
            "num_workers": max(1, self.num_workers),
            "volumes_2d": self.batch_size,
            "volumes_3d": self.batch_size // self.crops,
            "ratio_3d": self.ratio_3d,
        }

    def _load_drop(self) -> tuple[frozenset[str], str | None]:
        """Excluded patients (plus the other split's). Under DDP every rank must plan with the
        same list or batch counts differ and the job hangs: ranks compare versions and reload
        (the list file is replaced atomically) until they agree."""
        if self.exclusion is None:
            return self._split_drop, None
        dist = torch.distributed
        ddp = (
            self.world_size is None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        for _ in range(5):
            lst = self.exclusion_loader(self.exclusion)
            if not ddp:
                break
            versions: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(versions, lst.version)
            if len(set(versions)) == 1:
                break
        else:
            raise RuntimeError(f"{self.exclusion}: ranks keep reading different versions")
        key_id = getattr(lst, "key_id", None)
        if key_id and self.manifest.key_id and key_id not in manifest_key_ids(self.manifest):
            raise ValueError(
                f"{self.exclusion}: made under another pseudonymisation key than the manifest"
            )
        if self._patients is None:
            opted_out = frozenset(lst.pseudonyms)  # no copy when already a frozenset
        elif hasattr(lst, "among"):  # ExclusionList: no set of the whole list built
            opted_out = lst.among(self._patients)
        else:
            opted_out = self._patients.intersection(lst.pseudonyms)
        return (opted_out | self._split_drop if self._split_drop else opted_out), lst.version

    def _plans(
        self, epoch: int, drop: frozenset[str], lay: dict[str, Any], base: dict[int, Any]
    ) -> tuple[dict[int, EpochPlan | None], tuple[int, ...]]:
        """Per-dims plans and the shared schedule for one layout."""
        epoch_key = epoch if self.shuffle else 0

        def plan(d: int, **kw: Any) -> EpochPlan | None:
            if not self._shards[d]:
                return None
            return plan_epoch(
                self._shards[d], drop, seed=self.seed, epoch=epoch_key,
                world_size=lay["world_size"], num_workers=lay["num_workers"],
                batch_size=lay[f"volumes_{d}d"], remaining=base.get(d), salt=d, **kw,
            )  # fmt: skip

        first = {d: plan(d) for d in (2, 3)}
        n = {d: p.batches_per_rank if p else 0 for d, p in first.items()}
        n2, n3 = cap_by_ratio(n[2], n[3], lay["ratio_3d"])
        schedule = batch_schedule(n2, n3, seed=self.seed, epoch=epoch_key)
        counts = worker_dims_counts(schedule, lay["num_workers"])
        plans = {
            d: plan(d, worker_batches=[c[d] for c in counts], max_batches=(n2, n3)[d - 2])
            for d in (2, 3)
        }
        return plans, schedule

    def _prepare(self, epoch: int) -> None:
        drop, version = self._load_drop()
        lay = self._layout()
        resume = self._resume if self._resume and self._resume["epoch"] == epoch else None
        self._resume = None
        base: dict[int, Any] = {2: None, 3: None}
        steps = 0
        if resume is not None:
            base = {int(d): v for d, v in resume["base"].items()}
            if resume["exclusion_version"] != version:
                log.warning("exclusion list changed since the checkpoint: positions reinterpreted")
            old = resume["layout"]
            same = {k: v for k, v in old.items() if k != "rank"} == {
                k: v for k, v in lay.items() if k != "rank"
            }
            if same:
                steps = resume["steps"]
            else:  # replan what no rank has visited yet under the new layout
                plans, schedule = self._plans(epoch, drop, old, base)
                done = worker_dims_counts(schedule, old["num_workers"], resume["steps"])
                base = {
                    d: None
                    if p is None
                    else remaining_after(
                        p,
                        [c[d] * old[f"volumes_{d}d"] for c in done],
                        block_size=self.shuffle_block if self.shuffle else None,
                        permutation=self._block_permutation(epoch, d, base[d]),
                    )
                    for d, p in plans.items()
                }
        plans, schedule = self._plans(epoch, drop, lay, base)
        self._state = _Epoch(epoch, plans, schedule, steps, lay, base, drop, version)
        self.epoch, self._steps = epoch, steps
        excluded = sum(r.samples - r.kept(drop) for r in self.manifest.shards) - sum(
            r.samples - r.kept(self._split_drop) for r in self.manifest.shards
        )
        left = sum(p.dropped for p in plans.values() if p is not None)
        log.info(
            "epoch %d: %d steps per rank, exclusion list %s drops %d samples, remainder %d",
            epoch, len(schedule) - steps, version, excluded, left,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Prepare ``epoch`` (reloads the exclusion list). Idempotent until iterated."""
        st = self._state
        if st is None or st.epoch != epoch or st.started:
            self._prepare(epoch)

    def begin_epoch(self) -> None:
        """Called once per pass over the data in the main process (``EpochLoader`` does it):
        starts the prepared epoch, or the next one if the prepared one was already iterated."""
        st = self._state
        if st is None:
            self._prepare(self.epoch)
        elif st.started:
            self._prepare(st.epoch + 1)
        assert self._state is not None
        self._state.started = True

    def __len__(self) -> int:
        """Batches per rank in the whole prepared epoch, counting those consumed before a
        resume (as Lightning counts: it restores its own position within the epoch)."""
        if self._state is None:
            self._prepare(self.epoch)
        assert self._state is not None
        return len(self._state.schedule)

    # ---- resume ---------------------------------------------------------------------------

    def consumed(self, n: int = 1) -> None:
        """Record that ``n`` more batches of this epoch were consumed (trained on)."""
        self._steps += n

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch: enough to resume exactly (see the module docstring)."""
        st = self._state
        if st is None:
            return {"format": STATE_FORMAT, "epoch": self.epoch, "steps": 0, "fresh": True}
        return {
            "format": STATE_FORMAT,
            "dataset": self.manifest.dataset,
            "manifest_version": self.manifest.version,
            "seed": self.seed,
            "epoch": st.epoch,
            "steps": self._steps,
            "finished": self._steps >= len(st.schedule),
            "layout": dict(st.layout),
            "base": {str(d): v for d, v in st.base.items()},
            "exclusion_version": st.exclusion_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration (any world size / worker count)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported stream state format {state.get('format')!r}")
        self._state = None
        if state.get("fresh"):
            self.epoch, self._resume = state["epoch"], None
            return
        for k, mine in (("dataset", self.manifest.dataset), ("seed", self.seed)):
            if state[k] != mine:
                raise ValueError(f"stream state is for {k}={state[k]!r}, this stream has {mine!r}")
        if state["manifest_version"] != self.manifest.version:
            raise ValueError(
                f"stream state is for manifest version {state['manifest_version']},"
                f" this stream reads version {self.manifest.version}"
            )
        if state["finished"]:
            self.epoch, self._resume = state["epoch"] + 1, None
        else:
            self.epoch, self._resume = state["epoch"], dict(state)
            self._resume["base"] = {
                d: None if v is None else [tuple(i) for i in v] for d, v in state["base"].items()
            }

    # ---- the worker pipeline ----------------------------------------------------------------

    def _url(self, shard: str) -> str:
        root = self.manifest.shard_dir
        if self.shard_url is None:
            return str(root / shard)
        return self.shard_url.format(path=shard, root=root)

    def _exclusion_filter(self, raw: Iterator[dict], shard: str, drop: frozenset[str]) -> Iterator:
        """Drop samples of excluded patients, reading meta.json only (no image decode), and
        samples of a patient the manifest does not list for ``shard`` (``drop`` holds only
        the listed ones: an unlisted patient could be an excluded one)."""
        listed = None if self._listed is None else self._listed.get(shard, {})
        for sample in raw:
            meta = decode_meta(sample, shard)
            patient = meta.get("patient")
            if patient in drop:
                self.stats["excluded"] += 1
                continue
            if listed is not None and patient not in listed:
                if not self.stats["unlisted"]:
                    log.warning("%s: a sample of a patient the manifest does not list, dropped"
                                " (counted in stats['unlisted'])", shard)  # fmt: skip
                self.stats["unlisted"] += 1
                continue
            sample["meta"] = meta
            yield sample

    def _read_piece(self, piece: Piece, drop: frozenset[str]) -> Iterator[dict[str, Any]]:
        """Decoded kept samples of one piece; on a read error, skipped and counted (or raised)."""
        raw = iter_shard(self._url(piece.shard))
        try:
            kept = self._exclusion_filter(raw, piece.shard, drop)
            for s in itertools.islice(kept, piece.first, piece.first + piece.count):
                # header only (the crop is read by the transform) where it can, else the array
                boxes = s["meta"].get("dims") in self._box_dims
                volume = open_volume(s, piece.shard, self._box_dims) if boxes else None
                yield {
                    "key": s["__key__"],
                    "image": load_image(s, piece.shard) if volume is None else volume,
                    "meta": s["meta"],
                    "report": decode_report(s),
                }
        except ShardReadError as e:
            if self.on_error == "raise":
                raise
            self.stats["corrupt"] += 1
            log.warning("skipping the rest of a piece: %s", e)
        finally:
            raw.close()

    def _volumes(self, pieces: list[Piece], drop: frozenset[str]) -> Iterator[dict[str, Any]]:
        """Exactly the planned number of samples: a shortfall (corrupt data) is filled with
        repeats of the last good sample, so every rank still yields the planned batches."""
        last, owed = None, 0
        for piece in pieces:
            got = 0
            for sample in self._read_piece(piece, drop):
                got += 1
                for _ in range(owed + 1):
                    yield sample
                last, owed = sample, 0
            owed += piece.count - got
            self.stats["padded"] += piece.count - got
            if last is not None and owed:
                yield from itertools.repeat(last, owed)
                owed = 0
        if owed:
            raise RuntimeError(
                f"no readable sample in shards {sorted({p.shard for p in pieces})} of this worker"
            )

    def _block_permutation(
        self, epoch: int, dims: int, base: Any
    ) -> Callable[[int, int, int, int], np.ndarray]:
        """The visiting order of block ``b`` of (rank, worker): a pure function of its position,
        so resume (and ``remaining_after``) can recompute it."""
        base_key = tuple(map(tuple, base or ()))

        def permutation(rank: int, worker: int, block: int, m: int) -> np.ndarray:
            if not self.shuffle:
                return np.arange(m)
            key = _seed(self.seed, epoch, dims, rank, worker, base_key, block)
            return np.random.default_rng(key).permutation(m)

        return permutation

    def _shuffled(
        self,
        pieces: list[Piece],
        skip: int,
        drop: frozenset[str],
        permutation: Callable[[int], np.ndarray],
    ) -> Iterator[dict[str, Any]]:
        """Blocks of ``shuffle_block`` samples, each visited in ``permutation(block, len)``
        order: skipping ``skip`` samples (resume) re-reads only the block it falls in."""
        n = sum(p.count for p in pieces)
        size = self.shuffle_block if self.shuffle else max(n, 1)
        first = skip // size
        samples = self._volumes(advance(pieces, first * size), drop)
        for b in range(first, -(-n // size)):
            block = list(itertools.islice(samples, min(size, n - b * size)))  # (m,) samples
            start = skip - b * size if b == first else 0
            for i in permutation(b, len(block))[start:]:
                yield block[i]

    def _augment(self, samples: Iterator[dict], dims: int, epoch: int) -> Iterator[list[dict]]:
        """MONAI transform, seeded per (seed, epoch, key): a volume gives its crops.

        A transform that reads crop boxes may meet a read error after the header was read
        cleanly (a shard cut or an I/O error meanwhile): the sample is skipped and counted as
        corrupt, and its place taken by the last good sample's crops (the next good one's when
        none came yet), so the worker still yields its planned batches (see ``_volumes``)."""
        transform = self.transforms[dims]
        last, owed = None, 0
        for s in samples:
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(_seed(self.seed, epoch, s["key"]) % 2**32)
            try:
                out = transform(s["image"], s["meta"])
            except ShardReadError as e:
                if self.on_error == "raise":
                    raise
                self.stats["corrupt"] += 1
                self.stats["padded"] += 1
                log.warning("skipping a sample: %s", e)
                if last is None:
                    owed += 1
                else:
                    yield last
                continue
            crops = [out] if isinstance(out, torch.Tensor) else list(out)
            group = [
                {"image": c, "key": s["key"], "meta": s["meta"], "report": s["report"]}
                for c in crops
            ]
            for _ in range(owed + 1):
                yield group
            last, owed = group, 0
        if owed:
            raise RuntimeError(f"no readable {dims}D sample among this worker's samples")

    def _collate(self, crops: list[dict]) -> dict[str, Any]:
        """Crops -> the training batch dict (contract in the brief / DESIGN)."""
        batch: dict[str, Any] = {
            "image": torch.stack([c["image"] for c in crops]),  # (B, C, *spatial)
            "modality": torch.tensor([MODALITIES.index(c["meta"]["modality"]) for c in crops]),
            "key": [c["key"] for c in crops],
            "patient": [c["meta"]["patient"] for c in crops],
        }
        if self.tokenize is not None:
            tok = self.tokenize([c["report"] for c in crops])
            batch["input_ids"] = torch.as_tensor(tok["input_ids"], dtype=torch.long)
            batch["attention_mask"] = torch.as_tensor(tok["attention_mask"], dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        in_process = info is None
        if in_process and not self._loader_began:
            self.begin_epoch()
        self._loader_began = False
        st = self._state
        assert st is not None
        worker, nw = (0, 1) if in_process else (info.id, info.num_workers)
        if nw != st.layout["num_workers"]:
            raise RuntimeError(
                f"stream planned for {st.layout['num_workers']} workers, DataLoader has {nw}:"
                " pass num_workers to ShardStream (or use EpochLoader)"
            )
        rank = st.layout["rank"]
        # The DataLoader hands the k-th batch of this pass to worker k % nw. A resumed pass
        # starts at step start_steps, so this worker plays the role of the uninterrupted
        # run's worker (worker + start_steps) % nw: it serves steps role, role + nw, ...
        role = (worker + st.start_steps) % nw
        mine = st.schedule[role::nw]
        done = worker_dims_counts(st.schedule, nw, st.start_steps)[role]
        crops: dict[int, Iterator[list[dict]]] = {}
        for d, plan in st.plans.items():
            if plan is None:
                continue
            vols = st.layout[f"volumes_{d}d"]
            perm = self._block_permutation(st.epoch, d, st.base[d])
            samples = self._shuffled(
                plan.pieces(rank, role),
                done[d] * vols,
                st.drop,
                lambda b, m, perm=perm: perm(rank, role, b, m),
            )
            crops[d] = self._augment(samples, d, st.epoch)
        first = sum(done.values())
        for d in mine[first:]:
            vols = st.layout[f"volumes_{d}d"]
            group = [c for volume in itertools.islice(crops[d], vols) for c in volume]
            if len(group) != self.batch_size:
                raise RuntimeError(
                    f"a {d}D batch has {len(group)} crops, expected {self.batch_size}:"
                    " check crops_per_volume against the transform"
                )
            if in_process and self.count_yielded:
                self._steps += 1
            yield self._collate(group)
        log.info("worker %d of rank %d, epoch %d: %s", worker, rank, st.epoch, dict(self.stats))


class EpochLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` that starts the stream's epoch on each pass (in the
    main process, before the workers receive their copy)."""

    def __init__(self, dataset: ShardStream, **kwargs: Any) -> None:
        kwargs.setdefault("num_workers", dataset.num_workers)
        if kwargs["num_workers"] != dataset.num_workers:
            raise ValueError("EpochLoader num_workers must equal the stream's num_workers")
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep a stale plan and exclusion list")
        kwargs["batch_size"] = None  # the stream yields whole batches
        super().__init__(dataset, **kwargs)

    def __iter__(self):  # type: ignore[override]
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        ds.begin_epoch()
        ds._loader_began = self.num_workers == 0  # the in-process __iter__ must not begin again
        return super().__iter__()
