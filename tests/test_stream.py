"""The streaming pipeline: plan arithmetic, exclusions, equal batches per rank, exact resume,
corrupt shards, a real DataLoader. Tiny arrays; ranks and workers are simulated by injecting
rank/world size and patching ``get_worker_info`` (no processes, except one DataLoader test)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import foundation.data.stream as stream_mod
from foundation.data.plan import (
    batch_schedule,
    cap_by_ratio,
    plan_epoch,
    remaining_after,
    to_pieces,
    total,
)
from foundation.data.stream import EpochLoader, ShardStream
from foundation.data.transforms import train_transform
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest
from foundation.shards.writer import ShardWriter

N_PATIENTS = 10


def _patient(i: int) -> str:
    return f"{i:024x}"


def build_dataset(root: Path, n3: int = 41, n2: int = 23, max_samples: int = 4) -> Path:
    """Samples of N_PATIENTS patients, 3D (4,4,2) int16 and 2D (4,4) float16, small shards."""
    rng = np.random.default_rng(0)
    shard_dir = root / "shards"
    with ShardWriter(shard_dir, max_samples=max_samples) as w:
        for i in range(n3 + n2):
            dims = 3 if i < n3 else 2
            shape = (4, 4, 2) if dims == 3 else (4, 4)
            image = (
                rng.integers(-1000, 1000, shape).astype(np.int16)
                if dims == 3
                else rng.random(shape).astype(np.float16)
            )
            study = f"{i:08x}"
            meta = {
                "patient": _patient(i % N_PATIENTS),
                "study": study,
                "modality": "CT" if dims == 3 else "XR",
                "dims": dims,
                "spacing": [1.0] * dims,
                "shape": list(shape),
            }
            w.write(Sample(sample_key(study, 0), image, meta, f"report {i}"))
    records = w.close()
    manifest = Manifest(dataset="tiny", key_id="k0", shards=records, shard_root="shards")
    path = root / "tiny-v1.json"
    manifest.save(path)
    return path


def save_exclusions(path: Path, patients: list[int]) -> Path:
    entries = [ExclusionEntry(_patient(p), "opposition", "2024-01-01") for p in patients]
    ExclusionList(entries).save(path)
    return path


def all_keys(manifest: Path, excluded: set[int]) -> dict[int, set[str]]:
    """Expected keys per dims from the shards' records."""
    m = Manifest.load(manifest)
    from foundation.shards.reader import iter_samples

    out: dict[int, set[str]] = {2: set(), 3: set()}
    drop = {_patient(p) for p in excluded}
    for s in iter_samples(m, decode_image=False):
        if s.meta["patient"] not in drop:
            out[s.meta["dims"]].add(s.key)
    return out


def run_rank(stream: ShardStream, limit: int | None = None, state=None) -> list[dict]:
    """The batches a rank's DataLoader would yield: workers served round robin, simulated in
    process by patching get_worker_info. Stops after ``limit`` batches (then records them)."""
    nw = max(1, stream.num_workers)
    if state is not None:
        stream.load_state_dict(state)
    stream.begin_epoch()
    iters = []
    for w in range(nw):
        info = SimpleNamespace(id=w, num_workers=nw)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream_mod, "get_worker_info", lambda info=info: info)
            # materialise lazily: each worker's generator must see its own worker info
            iters.append(_bound_iter(stream, info))
    out: list[dict] = []
    alive = list(range(nw))
    order = itertools.cycle(range(nw))  # as torch's DataLoader: worker 0 first, every pass
    while alive and (limit is None or len(out) < limit):
        w = next(order)
        if w not in alive:
            continue
        try:
            out.append(next(iters[w]))
        except StopIteration:
            alive.remove(w)
    stream.consumed(len(out))
    return out


def _bound_iter(stream: ShardStream, info):
    """A generator that runs the stream's worker code with ``get_worker_info() == info``."""
    gen = None
    while True:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream_mod, "get_worker_info", lambda: info)
            if gen is None:
                gen = iter(stream)
            try:
                item = next(gen)
            except StopIteration:
                return
        yield item


def make(manifest: Path, excl: Path | None, **kw) -> ShardStream:
    kw.setdefault("batch_size", 2)
    kw.setdefault("seed", 7)
    return ShardStream(manifest, excl, count_yielded=False, **kw)


# ---- plan (pure) ---------------------------------------------------------------------------


def test_plan_equal_spans_exact_cover_and_resume_intervals():
    shards = [(f"s{i}", {"a": 3, "b": i % 3}) for i in range(5)]
    plan = plan_epoch(
        shards, frozenset({"b"}), seed=1, epoch=0, world_size=2, num_workers=3, batch_size=2
    )
    assert sum(n for _, n in plan.order) == 15
    assert plan.batches_per_rank == 3 and plan.dropped == 15 - 12
    covered = [i for r in plan.spans for w in r for a, b in w for i in range(a, b)]
    assert sorted(covered) == list(range(12))  # each kept position once, the tail dropped
    pieces = plan.pieces(1, 0)
    assert sum(p.count for p in pieces) == 2 and all(p.count > 0 for p in pieces)
    # worker j consumed its first batch: remaining excludes exactly those positions
    left = remaining_after(plan, [2, 0, 0])
    assert total(left) == 12 - 4
    plan2 = plan_epoch(
        shards, frozenset({"b"}), seed=1, epoch=0, world_size=3, num_workers=1, batch_size=2,
        remaining=left,
    )  # fmt: skip
    again = [i for r in plan2.spans for w in r for a, b in w for i in range(a, b)]
    assert not set(again) & {i for r in plan.spans for a, b in r[0][:1] for i in range(a, a + 2)}
    assert to_pieces(plan.order, [(0, 15)])[0].first == 0


def test_schedule_and_ratio():
    assert cap_by_ratio(10, 100, 0.5) == (10, 10)
    assert cap_by_ratio(10, 3, 0.5) == (3, 3)
    assert cap_by_ratio(10, 3, None) == (10, 3)
    # one kind only (a CT-only dataset, or a split too small for one 2D batch): keep it whole
    assert cap_by_ratio(0, 7, 0.45) == (0, 7) and cap_by_ratio(5, 0, 0.45) == (5, 0)
    assert cap_by_ratio(10, 100, 0.0) == (10, 0) and cap_by_ratio(10, 100, 1.0) == (0, 100)
    s = batch_schedule(4, 6, seed=0, epoch=1)
    assert Counter(s) == {2: 4, 3: 6} and s == batch_schedule(4, 6, seed=0, epoch=1)


# ---- the stream ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("ds"))


def epoch_keys(manifest, excl, world=2, workers=3, epoch=0, **kw):
    per_rank = []
    for r in range(world):
        s = make(manifest, excl, rank=r, world_size=world, num_workers=workers, **kw)
        s.set_epoch(epoch)
        per_rank.append(run_rank(s))
    return per_rank


def test_one_epoch_two_ranks_three_workers(dataset, tmp_path):
    excl = save_exclusions(tmp_path / "excl.json", [3, 7])
    per_rank = epoch_keys(dataset, excl)
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # same number of batches on every rank
    expected = all_keys(dataset, {3, 7})
    for d in (2, 3):
        got = [k for rank in per_rank for b in rank if b["image"].ndim == d + 2 for k in b["key"]]
        assert len(got) == len(set(got))  # each once
        assert set(got) <= expected[d]
        # only the documented remainder (< world_size x batch) is left out
        assert 0 <= len(expected[d]) - len(got) < 2 * 2
    for rank in per_rank:
        for b in rank:
            assert b["image"].dtype == torch.float32 and len(set(b["image"].shape[2:])) >= 1
            assert b["modality"].dtype == torch.int64
            assert not {_patient(3), _patient(7)} & set(b["patient"])


def test_exclusion_change_between_epochs_and_after_resume(dataset, tmp_path):
    excl = save_exclusions(tmp_path / "excl.json", [1])
    s = make(dataset, excl, rank=0, world_size=1, num_workers=2)
    first = run_rank(s, limit=3)
    state = s.state_dict()
    save_exclusions(excl, [1, 2, 5])  # opt-outs arrive while the job is down
    s2 = make(dataset, excl, rank=0, world_size=1, num_workers=2)
    rest = run_rank(s2, state=state)
    nxt = run_rank(s2)  # next epoch
    assert s2.epoch == 1
    for b in rest + nxt:
        assert not {_patient(1), _patient(2), _patient(5)} & set(b["patient"])
    assert not {_patient(1)} & {p for b in first for p in b["patient"]}


@pytest.mark.parametrize("workers_after", [3, 1])
def test_resume_equals_uninterrupted(dataset, tmp_path, workers_after):
    excl = save_exclusions(tmp_path / "excl.json", [4])
    full = run_rank(make(dataset, excl, rank=0, world_size=1, num_workers=3))
    s = make(dataset, excl, rank=0, world_size=1, num_workers=3)
    head = run_rank(s, limit=5)
    state = s.state_dict()
    s2 = make(dataset, excl, rank=0, world_size=1, num_workers=workers_after)
    tail = run_rank(s2, state=state)
    keys = lambda bs: [k for b in bs for k in b["key"]]  # noqa: E731
    assert keys(head) == keys(full[:5])
    if workers_after == 3:  # same layout: exactly the uninterrupted run's rest
        assert keys(tail) == keys(full[5:])
        for a, b in zip(tail, full[5:], strict=True):
            assert torch.equal(a["image"], b["image"])
    else:  # another layout: nothing repeated, nothing lost beyond the remainder
        got = keys(head) + keys(tail)
        assert len(got) == len(set(got))
        assert 0 <= len(set(keys(full))) - len(got) < 2 * 2 * 3


def test_resume_with_other_world_size(dataset, tmp_path):
    excl = save_exclusions(tmp_path / "excl.json", [])
    ranks = [make(dataset, excl, rank=r, world_size=2, num_workers=2) for r in range(2)]
    heads = [run_rank(s, limit=3) for s in ranks]
    state = ranks[0].state_dict()
    s = make(dataset, excl, rank=0, world_size=1, num_workers=1)
    tail = run_rank(s, state=state)
    got = [k for bs in [*heads, tail] for b in bs for k in b["key"]]
    expected = all_keys(dataset, set())
    assert len(got) == len(set(got))
    assert set(got) <= expected[2] | expected[3]
    assert len(expected[2] | expected[3]) - len(got) < 2 * 2 * 2 * 2


def test_ratio_and_crops_per_volume(dataset):
    s = make(
        dataset, None, rank=0, world_size=1, ratio_3d=0.5, batch_size=4, crops_per_volume=2,
        transform_3d=train_transform(3, (4, 4, 2), crops_per_volume=2),
        transform_2d=train_transform(2, (4, 4)),
    )  # fmt: skip
    batches = run_rank(s)
    dims = Counter(b["image"].ndim - 2 for b in batches)
    assert dims[2] == dims[3] > 0
    for b in batches:
        if b["image"].ndim == 5:  # 3D: 2 volumes x 2 crops
            assert len(set(b["key"])) == 2 and len(b["key"]) == 4
        assert b["image"].min() >= 0 and b["image"].max() <= 1  # windowed CT, XR in [0, 1]


def test_tokenize_is_applied(dataset):
    def tokenize(texts):
        ids = [[len(t), 1, 0] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1, 1, 0]] * len(texts)}

    b = next(iter(make(dataset, None, rank=0, world_size=1, tokenize=tokenize)))
    assert b["input_ids"].shape == (2, 3) and b["input_ids"].dtype == torch.int64
    assert "input_ids" not in next(iter(make(dataset, None, rank=0, world_size=1)))


def test_corrupt_shard_skipped_counted_or_raised(tmp_path):
    manifest = build_dataset(tmp_path, n3=12, n2=0, max_samples=4)
    m = Manifest.load(manifest)
    victim = m.shard_paths()[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    s = make(manifest, None, rank=0, world_size=1)
    batches = run_rank(s)
    assert len(batches) == 12 // 2  # the planned count still comes out (padded)
    assert s.stats["corrupt"] == 1 and s.stats["padded"] > 0
    with pytest.raises(Exception, match=victim.name):
        run_rank(make(manifest, None, rank=0, world_size=1, on_error="raise"))


def _volume_dataset(root: Path, n: int = 12) -> Path:
    """3D volumes large enough that a crop reads a part of them (read by boxes)."""
    rng = np.random.default_rng(1)
    with ShardWriter(root / "shards", max_samples=4) as w:
        for i in range(n):
            meta = {"patient": _patient(i % 3), "study": f"{i:08x}", "modality": "CT",
                    "dims": 3, "spacing": [1.0] * 3, "shape": [8, 8, 4]}  # fmt: skip
            image = rng.integers(-1000, 1000, (8, 8, 4)).astype(np.int16)
            w.write(Sample(sample_key(meta["study"], 0), image, meta, "r"))
    manifest = Manifest(dataset="vol", key_id="k0", shards=w.close(), shard_root="shards")
    return manifest.save(root / "vol-v1.json")


def test_crop_read_error_after_header_is_skipped_counted_or_raised(tmp_path, monkeypatch):
    """An I/O error while the transform reads a crop box (the header was read cleanly) skips
    the sample, counts it as corrupt and keeps the planned batches; ``raise`` raises."""
    import foundation.shards.npy_slab as slab

    manifest = _volume_dataset(tmp_path)
    kw = dict(rank=0, world_size=1, num_workers=2, shuffle_block=4)
    kw["transform_3d"] = train_transform(3, (4, 4, 4))
    clean = make(manifest, None, **kw)
    expected = run_rank(clean)
    assert clean.stats["corrupt"] == 0 and len(expected) == 12 // 2

    real, calls = slab._pread_into, Counter()

    def flaky(fd, view, offset):  # preads 3 and 4 fail (2 samples), as a disk error would
        calls["n"] += 1
        if calls["n"] in (3, 4):
            raise OSError(5, "Input/output error")
        return real(fd, view, offset)

    monkeypatch.setattr(slab, "_pread_into", flaky)
    s = make(manifest, None, **kw)
    batches = run_rank(s)
    assert len(batches) == len(expected)  # the job goes on with its planned batches
    assert all(len(b["key"]) == 2 for b in batches)
    assert s.stats["corrupt"] == 2 and s.stats["padded"] == 2
    got = Counter(k for b in batches for k in b["key"])
    assert sum(got.values()) == 12 and len(got) == 12 - 2  # two replaced by repeats
    calls.clear()
    with pytest.raises(Exception, match=r"\.tar: corrupt or truncated"):
        run_rank(make(manifest, None, on_error="raise", **kw))


def test_crop_read_of_a_shard_truncated_after_its_headers_were_read(tmp_path):
    """The shard file is cut while the volumes of a shuffle block are open (headers read):
    their crop reads fail; skipped and counted, the planned batches still come out."""
    manifest = _volume_dataset(tmp_path, n=8)
    victim = Manifest.load(manifest).shard_paths()[0]
    cut = train_transform(3, (4, 4, 4))

    def transform(image, meta):
        if victim.stat().st_size > 1024:  # first call: the block's headers are read already
            with open(victim, "r+b") as f:
                f.truncate(1024)  # keeps the first member's header only
        return cut(image, meta)

    transform.reads_boxes = True
    transform.set_random_state = cut.set_random_state
    s = make(manifest, None, rank=0, world_size=1, shuffle=False, transform_3d=transform)
    batches = run_rank(s)
    assert len(batches) == 8 // 2 and sum(len(b["key"]) for b in batches) == 8
    # shuffle off: the one block holds every volume, opened before the first crop read, so
    # all 4 of the cut shard fail in the transform (a volume's data lies past byte 1024)
    assert s.stats["corrupt"] == s.stats["padded"] == 4


def test_workers_receive_only_the_manifests_excluded_patients(dataset, tmp_path):
    """A list of many pseudonyms, a few of this dataset: the epoch state sent to workers holds
    the dataset's excluded patients only, and the filter still drops them."""
    lst = ExclusionList(
        [ExclusionEntry(f"{10**12 + i:024x}", "opposition", "2024-01-01") for i in range(5000)]
        + [ExclusionEntry(_patient(p), "erasure", "2024-01-01") for p in (2, 6)]
    )
    lst.save(tmp_path / "excl.json")
    s = make(dataset, tmp_path / "excl.json", rank=0, world_size=1, num_workers=2)
    s.set_epoch(0)
    assert s._state.drop == {_patient(2), _patient(6)}
    assert s._state.exclusion_version == lst.version
    seen = {p for b in run_rank(s) for p in b["patient"]}
    assert seen and not {_patient(2), _patient(6)} & seen


def test_a_patient_the_manifest_does_not_list_is_never_yielded(tmp_path):
    """The manifest of a shard omits a patient (stale or edited): that patient's samples are
    dropped and counted, whatever the exclusion list holds."""
    manifest = build_dataset(tmp_path, n3=12, n2=0, max_samples=4)
    m = Manifest.load(manifest)
    hidden = _patient(2)  # sample 2 only, in the first shard
    rec = next(r for r in m.shards if hidden in r.patients)
    rec.patients[_patient(99)] = rec.patients.pop(hidden)  # counts still add up
    m.save(manifest)
    s = make(manifest, None, rank=0, world_size=1)
    batches = run_rank(s)
    assert s.stats["unlisted"] == 1 and len(batches) == 12 // 2
    assert hidden not in {p for b in batches for p in b["patient"]}


def test_missing_shard_and_revoked_manifest(tmp_path):
    manifest = build_dataset(tmp_path, n3=4, n2=0)
    m = Manifest.load(manifest)
    m.revoked_by = 2
    m.save(tmp_path / "revoked.json")
    with pytest.raises(ValueError, match="use version 2"):
        make(tmp_path / "revoked.json", None)
    m.shard_paths()[0].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        make(manifest, None)


def test_real_dataloader_two_workers(dataset, tmp_path):
    excl = save_exclusions(tmp_path / "excl.json", [0])
    s = make(dataset, excl, rank=0, world_size=1, num_workers=2)
    loader = EpochLoader(s, num_workers=2)
    keys = [k for b in loader for k in b["key"]]
    expected = all_keys(dataset, {0})
    assert len(keys) == len(set(keys)) and set(keys) <= expected[2] | expected[3]
    assert len(expected[2] | expected[3]) - len(keys) < 2 * 2
    assert s.epoch == 0
    list(loader)
    assert s.epoch == 1  # the next pass started the next epoch


# ---- the data module ----------------------------------------------------------------------


def test_datamodule_refuses_mixed_specs_and_revoked(tmp_path):
    from foundation.data.datamodule import ShardDataModule
    from foundation.shards.manifest import ManifestError

    a = build_dataset(tmp_path / "a", n3=4, n2=0)
    b_path = build_dataset(tmp_path / "b", n3=4, n2=0)
    b = Manifest.load(b_path)
    b.preprocessing = {"version": "other"}
    b.save(b_path)
    with pytest.raises(ManifestError, match="preprocessing"):
        _ = ShardDataModule([str(a), str(b_path)]).manifest
    b.preprocessing = {}
    b.revoked_by = 3
    b.save(b_path)
    with pytest.raises(ManifestError, match="use version 3"):
        _ = ShardDataModule(str(b_path)).preprocessing
    b.revoked_by = None
    b.save(b_path)
    dm = ShardDataModule([str(a), str(b_path)], batch_size=2, num_workers=0, val_fraction=0.0)
    dm.setup("fit")
    assert dm.preprocessing == {} and len(dm.manifest.shards) == 2
    assert len(dm.train_stream) == 4  # 8 3D volumes from both manifests, batches of 2


@pytest.mark.slow
def test_lightning_checkpoint_resume_is_exact(tmp_path):
    """Killed mid-epoch (2 DataLoader workers), resumed from the Lightning checkpoint: the
    batches trained on equal the uninterrupted run's."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from foundation.data.datamodule import ShardDataModule

    ds = build_dataset(tmp_path, n3=30, n2=20)

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.seen: list[tuple[str, ...]] = []

        def training_step(self, batch, i):
            self.seen.append(tuple(batch["key"]))
            return self.lin(batch["image"].mean().view(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 33:
                raise SystemError("preempted")

    def dm():
        return ShardDataModule(
            str(ds), batch_size=2, num_workers=2, crop_size_3d=(4, 4, 2), crop_size_2d=(4, 4),
            val_fraction=0.0, pin_memory=False,
        )  # fmt: skip

    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    kw |= dict(accelerator="cpu", max_epochs=2)
    full = Model()
    L.Trainer(enable_checkpointing=False, **kw).fit(full, datamodule=dm())
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=30, save_top_k=-1, filename="c")
    first = Model()
    with pytest.raises(SystemError):
        L.Trainer(default_root_dir=tmp_path, callbacks=[ckpt, Stop()], **kw).fit(
            first, datamodule=dm()
        )
    rest = Model()
    L.Trainer(enable_checkpointing=False, **kw).fit(
        rest, datamodule=dm(), ckpt_path=tmp_path / "c.ckpt"
    )
    assert len(full.seen) > 30 and full.seen == first.seen[:30] + rest.seen


def test_pipe_urls(dataset):
    local = [k for b in make(dataset, None, rank=0, world_size=1) for k in b["key"]]
    piped = make(dataset, None, rank=0, world_size=1, shard_url="pipe:cat {root}/{path}")
    assert [k for b in piped for k in b["key"]] == local


def test_ratio_3d_shapes_training_not_validation(dataset):
    from foundation.data.datamodule import ShardDataModule

    dm = ShardDataModule(
        str(dataset), batch_size=2, num_workers=0, ratio_3d=0.0, val_fraction=0.5,
        crop_size_3d=(4, 4, 2), crop_size_2d=(4, 4), pin_memory=False,
    )  # fmt: skip
    dm.setup("fit")
    train = Counter(b["image"].ndim - 2 for b in run_rank(dm.train_stream))
    val = Counter(b["image"].ndim - 2 for b in run_rank(dm.val_stream))
    assert train[2] > 0 and train[3] == 0  # ratio_3d 0: 2D batches only
    assert val[2] > 0 and val[3] > 0  # validation reads every batch of both kinds
