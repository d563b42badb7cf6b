"""Crop-aware reads: an ``NpyVolume`` read by boxes gives exactly the whole array's values, the
training transform gives the same tensors from it as from the array (same seed), the stream
gives the same batches from local shards (box reads) as from pipes (whole reads), and damage is
still a ``ShardReadError`` naming the shard."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.data.stream import ShardStream
from foundation.data.transforms import TrainTransform
from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest
from foundation.shards.npy_slab import NpyVolume, open_volume, read_stats
from foundation.shards.reader import ShardReadError, iter_shard, load_image
from foundation.shards.writer import ShardWriter

# (X, Y, Z): larger than the crop (12, 10, 6), smaller on some axes (zero pad), exactly the crop
SHAPES = [(30, 24, 14), (9, 40, 5), (12, 10, 6), (7, 8, 3), (25, 10, 20)]
CROP = (12, 10, 6)


def _write(root: Path, shapes=SHAPES, max_samples: int = 2) -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(root / "shards", max_samples=max_samples) as w:
        for i, shape in enumerate(shapes):
            image = rng.integers(-1024, 2000, shape).astype(np.int16)
            meta = {"patient": f"{i % 3:024x}", "study": f"{i:08x}", "modality": "CT", "dims": 3,
                    "spacing": [1.0] * 3, "shape": list(shape)}  # fmt: skip
            w.write(Sample(sample_key(f"{i:08x}", 0), image, meta, f"report {i}"))
    return Manifest(dataset="slab", key_id="k", shards=w.close(), shard_root="shards").save(
        root / "slab-v1.json"
    )


def _pairs(manifest: Path) -> list[tuple[NpyVolume, np.ndarray]]:
    """(volume read by boxes, whole array) for every sample; volumes outlive the iterators."""
    out = []
    for path in Manifest.load(manifest).shard_paths():
        for raw in iter_shard(str(path)):
            vol = open_volume(raw, path.name)
            assert isinstance(vol, NpyVolume)
            out.append((vol, load_image(raw, path.name)))
    return out


def test_boxes_read_exactly_the_arrays_values(tmp_path):
    rng = np.random.default_rng(1)
    for vol, array in _pairs(_write(tmp_path)):  # the iterators are closed by now
        assert vol.shape == array.shape and vol.dtype == array.dtype
        assert np.array_equal(vol.read(), array)
        boxes = []
        for _ in range(6):
            lo = [int(rng.integers(0, n)) for n in array.shape]
            boxes.append(tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, array.shape, strict=True)))  # fmt: skip
        full_y = (slice(1, 3), slice(None), slice(0, array.shape[2]))  # one contiguous run
        boxes.append(full_y)
        for box in boxes:
            assert np.array_equal(vol[box], array[box])
        # several boxes at once: the union read or one read per box, the same values
        for group in (boxes[:2], boxes[:4], [boxes[0], boxes[0]], boxes):
            got = vol.read_boxes(group)
            assert all(np.array_equal(g, array[b]) for g, b in zip(got, group, strict=True))


def test_a_crop_reads_its_rows_only(tmp_path):
    (vol, array), *_ = _pairs(_write(tmp_path))
    read_stats.clear()
    box = (slice(3, 9), slice(4, 10), slice(2, 8))  # 6 x-rows of 6 y-rows, whole z rows
    assert np.array_equal(vol[box], array[box])
    assert read_stats["bytes"] == 6 * 6 * array.shape[2] * 2 < array.nbytes // 10
    assert read_stats["reads"] == 6
    far = [(slice(0, 2), slice(0, 2), slice(0, 2)), (slice(28, 30), slice(22, 24), slice(0, 2))]
    read_stats.clear()
    vol.read_boxes(far)  # far apart: two small reads, not their union (the whole volume)
    assert read_stats["bytes"] == 2 * 2 * 2 * array.shape[2] * 2


@pytest.mark.parametrize("crops", [1, 2, 3])
@pytest.mark.parametrize("multi_window", [False, True])
def test_transform_from_boxes_equals_transform_from_the_array(tmp_path, crops, multi_window):
    t = TrainTransform(3, CROP, crops_per_volume=crops, multi_window=multi_window, flips=True)
    assert t.reads_boxes and not TrainTransform(2, (4, 4)).reads_boxes
    flipped = 0
    for vol, array in _pairs(_write(tmp_path)):
        for seed in range(8):
            t.set_random_state(seed)
            want = t(array, {"modality": "CT"})
            t.set_random_state(seed)
            got = t(vol, {"modality": "CT"})
            assert len(got) == len(want) == crops
            for g, w in zip(got, want, strict=True):
                assert g.shape == (t.channels, *CROP) and torch.equal(g, w)
                flipped += int(not torch.equal(w, w.flip(1)))
    assert flipped  # flips were exercised


def test_stream_from_boxes_equals_stream_from_whole_reads(tmp_path):
    """Local shards (volumes read by boxes) and ``pipe:`` URLs (whole reads, no seek): the same
    keys and the same tensors, crops_per_volume=2 and volumes smaller than the crop included."""
    manifest = _write(tmp_path, SHAPES * 2, max_samples=3)

    def batches(**kw):
        t = TrainTransform(3, CROP, crops_per_volume=2)
        s = ShardStream(manifest, None, transform_3d=t, batch_size=4, crops_per_volume=2,
                        seed=3, rank=0, world_size=1, shuffle_block=4, **kw)  # fmt: skip
        return list(s)

    read_stats.clear()
    local = batches()
    assert read_stats["bytes"] > 0  # the box path ran
    piped = batches(shard_url="pipe:cat {root}/{path}")
    assert len(local) == len(piped) == len(SHAPES) * 2 // 2
    for a, b in zip(local, piped, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def _tar_with_image(path: Path, npy: bytes) -> None:
    """A one-sample shard written by hand (to store an image that lies about its size)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("000_0.img.npy", npy), ("000_0.meta.json", b'{"patient": "p"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_damage_is_a_shard_read_error_and_fallbacks(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    short = tmp_path / "short.tar"  # the header promises more data than the member holds
    _tar_with_image(short, buf.getvalue()[:-10])
    for raw in iter_shard(str(short)):
        with pytest.raises(ShardReadError, match=r"short\.tar: img\.npy is not a readable"):
            open_volume(raw, short.name)

    for cut in (200, 10):  # the file shrinks under an open iterator: in the data, the header
        shard = Manifest.load(_write(tmp_path / f"cut{cut}")).shard_paths()[0]
        for raw in iter_shard(str(shard)):
            os.truncate(shard, raw["img.npy"].offset + cut)
            with pytest.raises(ShardReadError, match=rf"{shard.name}: corrupt or truncated"):
                open_volume(raw, shard.name)
            break

    fortran, other = tmp_path / "fortran.tar", _write(tmp_path / "other")
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.zeros((4, 5, 6), dtype=np.int16)))
    _tar_with_image(fortran, buf.getvalue())
    assert [open_volume(r, "f") for r in iter_shard(str(fortran))] == [None]  # whole read
    path = Manifest.load(other).shard_paths()[0]
    assert all(open_volume(r, "p") is None for r in iter_shard(f"pipe:cat {path}"))
    assert all(open_volume(r, "p", dims=(2,)) is None for r in iter_shard(str(path)))


def test_corrupt_shard_skipped_and_counted_with_box_reads(tmp_path):
    manifest = _write(tmp_path, SHAPES * 2, max_samples=2)
    victim = Manifest.load(manifest).shard_paths()[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    def stream(on_error: str) -> ShardStream:
        return ShardStream(manifest, None, transform_3d=TrainTransform(3, CROP), batch_size=2,
                           seed=0, rank=0, world_size=1, on_error=on_error)  # fmt: skip

    s = stream("skip")
    assert len(list(s)) == len(SHAPES)  # the planned count still comes out (padded)
    assert s.stats["corrupt"] == 1 and s.stats["padded"] > 0
    with pytest.raises(ShardReadError, match=victim.name):
        list(stream("raise"))
