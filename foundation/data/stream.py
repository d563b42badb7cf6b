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
receive the epoch's plan anew). The stages live in ``worker_stages``, the exclusion list and
filter in ``exclusion_filter``, the epoch state and resume bookkeeping in ``stream_state``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundation.data.exclusion_filter import load_excluded, load_exclusion_list
from foundation.data.plan import (
    EpochPlan,
    Piece,
    batch_schedule,
    cap_by_ratio,
    plan_epoch,
    worker_dims_counts,
)
from foundation.data.stream_state import (
    STATE_FORMAT,
    EpochState,
    resume_point,
    state_from_dict,
    state_to_dict,
)
from foundation.data.worker_stages import (
    Tokenize,
    Transform,
    augment,
    block_permutation,
    block_shuffle,
    collate,
    pad_shortfall,
    read_piece,
)
from foundation.shards.manifest import Manifest

log = logging.getLogger(__name__)


def as_tensor(image: np.ndarray, meta: dict) -> list[torch.Tensor]:
    """Default transform: the stored array as float32 ``(1, *S)`` (tests, fixed-size data)."""
    return [torch.from_numpy(np.asarray(image, dtype=np.float32))[None]]


def in_val_split(patient: str, fraction: float) -> bool:
    """Patient-level split: a stable hash of the pseudonym below ``fraction`` -> validation."""
    h = int.from_bytes(hashlib.sha256(f"val-split:{patient}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


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
        self.exclusion_loader = exclusion_loader or load_exclusion_list
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
        self._state: EpochState | None = None
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
        """Excluded patients of this manifest (plus the other split's) and the list's version;
        every DDP rank plans with the same version (see ``load_excluded``)."""
        if self.exclusion is None:
            return self._split_drop, None
        opted_out, version = load_excluded(
            self.exclusion, self.exclusion_loader, self.manifest, self._patients,
            sync=self.world_size is None,
        )  # fmt: skip
        return (opted_out | self._split_drop if self._split_drop else opted_out), version

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
            base, steps = resume_point(
                resume, lay, version,
                lambda layout, b: self._plans(epoch, drop, layout, b),
                self.shuffle_block if self.shuffle else None,
                lambda d, b: self._block_permutation(epoch, d, b),
            )  # fmt: skip
        plans, schedule = self._plans(epoch, drop, lay, base)
        self._state = EpochState(epoch, plans, schedule, steps, lay, base, drop, version)
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
        return state_to_dict(self._state, self._steps, self.epoch, self.manifest, self.seed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration (any world size / worker count)."""
        if state.get("format") == STATE_FORMAT:
            self._state = None  # even if the checks below reject the state
        self.epoch, self._resume = state_from_dict(state, self.manifest, self.seed)

    # ---- the worker pipeline ----------------------------------------------------------------

    def _url(self, shard: str) -> str:
        root = self.manifest.shard_dir
        if self.shard_url is None:
            return str(root / shard)
        return self.shard_url.format(path=shard, root=root)

    def _block_permutation(
        self, epoch: int, dims: int, base: Any
    ) -> Callable[[int, int, int, int], np.ndarray]:
        return block_permutation(self.seed, self.shuffle, epoch, dims, base)

    def _samples(
        self, st: EpochState, dims: int, rank: int, role: int, skip: int
    ) -> Iterator[dict]:
        """The stages of one worker for one dims, after ``skip`` samples (resume)."""

        def read(piece: Piece) -> Iterator[dict[str, Any]]:
            # tar members -> exclusion filter -> this piece's window -> decode
            listed = None if self._listed is None else self._listed.get(piece.shard, {})
            url = self._url(piece.shard)
            return read_piece(
                piece, url, st.drop, listed, self._box_dims, self.on_error, self.stats
            )

        perm = self._block_permutation(st.epoch, dims, st.base[dims])
        return block_shuffle(
            st.plans[dims].pieces(rank, role),  # type: ignore[union-attr]
            skip,
            self.shuffle_block if self.shuffle else None,
            lambda b, m: perm(rank, role, b, m),
            lambda pieces: pad_shortfall(pieces, read, self.stats),  # the planned count
        )

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
            samples = self._samples(st, d, rank, role, done[d] * st.layout[f"volumes_{d}d"])
            crops[d] = augment(
                samples, self.transforms[d], d, self.seed, st.epoch, self.on_error, self.stats
            )
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
            yield collate(group, self.tokenize)
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
