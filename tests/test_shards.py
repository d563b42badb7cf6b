"""Shard writer, manifest, verification and sequential reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest, ManifestError
from foundation.shards.reader import (
    ShardReadError,
    decode_meta,
    decode_npy,
    decode_report,
    iter_samples,
    iter_shard,
    load_image,
)
from foundation.shards.verify import verify_manifest
from foundation.shards.writer import ShardWriter


def make_sample(i: int, dims: int = 3, patient: int | None = None) -> Sample:
    shape = (3, 4, 2) if dims == 3 else (5, 6)
    dtype = np.int16 if dims == 3 else np.float16
    image = (np.arange(np.prod(shape)).reshape(shape) + i).astype(dtype)
    study = f"{i:06x}"
    meta = {
        "patient": f"p{(i if patient is None else patient):023x}",
        "study": study,
        "modality": "CT" if dims == 3 else "XR",
        "dims": dims,
        "spacing": [1.0] * dims,
        "shape": list(shape),
    }
    return Sample(sample_key(study, 1), image, meta, f"rapport n°{i} : élément")


def write_dataset(root: Path, samples: list[Sample], **kw) -> Path:
    with ShardWriter(root / "shards", **kw) as w:
        for s in samples:
            w.write(s)
    m = Manifest(dataset="t", key_id="k", shards=w.close(), shard_root="shards")
    return m.save(root / "t-v1.json")


def test_writer_tmp_rename_sha_and_records(tmp_path):
    samples = [make_sample(i, dims=3, patient=i % 2) for i in range(5)] + [
        make_sample(10 + i, dims=2) for i in range(2)
    ]
    path = write_dataset(tmp_path, samples, max_samples=2)
    m = Manifest.load(path)
    assert not list((tmp_path / "shards").glob("*.tmp"))
    assert [r.path for r in m.shards] == [
        "shard-2d-000000.tar",
        "shard-3d-000000.tar",
        "shard-3d-000001.tar",
        "shard-3d-000002.tar",
    ]
    for rec, p in zip(m.shards, m.shard_paths(), strict=True):
        data = p.read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec.sha256 and len(data) == rec.bytes
        assert sum(rec.patients.values()) == rec.samples == len(rec.keys)
        assert len(rec.dims) == 1
    assert m.shards[1].patients == {f"p{0:023x}": 1, f"p{1:023x}": 1}
    assert m.num_samples == 7 and m.shards[0].modalities == ["XR"]


def test_writer_max_bytes_and_validation(tmp_path):
    big = [make_sample(i) for i in range(4)]
    with ShardWriter(tmp_path, max_bytes=3 * 1024) as w:  # ~1 sample of headers+data each
        for s in big:
            w.write(s)
        bad = make_sample(9)
        bad.meta["name"] = "x"  # not allow-listed
        with pytest.raises(ValueError, match="allow-list"):
            w.write(bad)
        with pytest.raises(ValueError, match="duplicate"):
            w.write(big[0])
    records = w.close()
    assert len(records) >= 2 and sum(r.samples for r in records) == 4


def test_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path) as w:
        w.write(make_sample(0))
        raise RuntimeError("boom")
    assert not list(tmp_path.glob("*.tar*"))


def test_roundtrip_iter_samples(tmp_path):
    samples = [make_sample(i) for i in range(3)] + [make_sample(5, dims=2)]
    path = write_dataset(tmp_path, samples)
    got = {s.key: s for s in iter_samples(path)}
    for s in samples:
        g = got[s.key]
        assert g.image.dtype == s.image.dtype and np.array_equal(g.image, s.image)
        assert g.meta == s.meta and g.report == s.report
    lazy = list(iter_samples(path, decode_image=False))
    assert len(lazy) == 4 and all(s.image.size == 0 for s in lazy)


def test_verify_catches_changed_byte_and_missing(tmp_path):
    path = write_dataset(tmp_path, [make_sample(i) for i in range(4)], max_samples=2)
    assert verify_manifest(path).ok
    m = Manifest.load(path)
    first, second = m.shard_paths()
    data = bytearray(first.read_bytes())
    data[700] ^= 0x01  # inside the first sample's data
    first.write_bytes(bytes(data))
    second.unlink()
    report = verify_manifest(path)
    assert not report.ok
    reasons = {p.path: p.reason for p in report.problems}
    assert "sha256" in reasons[m.shards[0].path] and reasons[m.shards[1].path] == "missing"


def test_verify_catches_sample_count(tmp_path):
    path = write_dataset(tmp_path, [make_sample(i) for i in range(3)])
    d = json.loads(path.read_text())
    d["shards"][0]["samples"] = 4
    path.write_text(json.dumps(d))
    problems = verify_manifest(path).problems
    assert len(problems) == 1 and "3 samples" in problems[0].reason


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match=r"bad\.json.*JSON"):
        Manifest.load(bad)
    bad.write_text(json.dumps({"schema_version": 99, "dataset": "x"}))
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.load(bad)
    bad.write_text(json.dumps({"schema_version": 1, "dataset": "x", "key_id": "k"}))
    with pytest.raises(ManifestError, match="shards"):
        Manifest.load(bad)


def test_manifest_save_is_atomic_and_roundtrips(tmp_path):
    path = write_dataset(tmp_path, [make_sample(0)])
    m = Manifest.load(path)
    m.version = 2
    m.exclusion_version = "abc"
    m.save(path)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [path.name]
    again = Manifest.load(path)
    assert again.to_dict() == m.to_dict() and again.shard_paths()[0].is_file()
    assert again.code_version.startswith("0.") and again.created


# ---- the reader: lazy image, pipes, truncation, npy decoding ---------------------------------


def _one_shard(tmp_path: Path, n: int = 3) -> tuple[list[Sample], Path]:
    samples = [make_sample(i) for i in range(n)]
    return samples, Manifest.load(write_dataset(tmp_path, samples)).shard_paths()[0]


def test_iter_shard_local_and_pipe_give_the_same_writable_arrays(tmp_path):
    samples, shard = _one_shard(tmp_path)
    for url in (str(shard), f"pipe:cat {shard}"):
        got = []
        for raw in iter_shard(url):
            image = load_image(raw, shard.name)  # while the iterator is open
            assert image.flags.writeable and raw["__url__"] == url
            got.append((raw["__key__"], image, decode_meta(raw), decode_report(raw)))
        assert [g[0] for g in got] == [s.key for s in samples]
        for (_, image, meta, report), s in zip(got, samples, strict=True):
            assert image.dtype == s.image.dtype and np.array_equal(image, s.image)
            assert meta == s.meta and report == s.report


def test_image_is_read_only_when_asked(tmp_path):
    """A damaged image payload does not stop a meta-only pass; decoding it names the shard."""
    _, shard = _one_shard(tmp_path)
    data = bytearray(shard.read_bytes())
    second = data.index(b"\x93NUMPY", data.index(b"\x93NUMPY") + 1)
    data[second : second + 6] = b"garbag"
    shard.write_bytes(bytes(data))
    manifest = tmp_path / "t-v1.json"
    assert len(list(iter_samples(manifest, decode_image=False))) == 3
    with pytest.raises(ShardReadError, match=rf"{shard.name}.*not a readable \.npy"):
        list(iter_samples(manifest))
    kept = []
    for raw in iter_shard(f"pipe:cat {shard}"):  # read eagerly from a pipe, decoded on demand
        kept.append(decode_meta(raw)["patient"])
    assert len(kept) == 3


def _member_ends(shard: Path) -> list[int]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["end-marker", "mid-image", "mid-header"])
def test_truncated_shard_raises_after_the_good_samples(tmp_path, cut):
    samples, shard = _one_shard(tmp_path)
    ends = _member_ends(shard)  # 3 parts per sample: img.npy, meta.json, report.txt
    # a part: pax header block + its data block + ustar header block, then the data
    size = {"end-marker": ends[-1], "mid-image": ends[5] + 1536 + 40, "mid-header": ends[2] + 100}
    shard.write_bytes(shard.read_bytes()[: size[cut]])
    keys = []
    with pytest.raises(ShardReadError, match=rf"{shard.name}: corrupt or truncated"):
        for raw in iter_shard(str(shard)):
            load_image(raw, shard.name)
            keys.append(raw["__key__"])
    good = {"end-marker": 2, "mid-image": 2, "mid-header": 0}[cut]
    assert keys == [s.key for s in samples[:good]]


def test_image_after_the_iterator_closed_is_a_clear_error(tmp_path):
    _, shard = _one_shard(tmp_path)
    raws = list(iter_shard(str(shard)))
    assert decode_meta(raws[0])["dims"] == 3  # small parts are plain bytes
    with pytest.raises(ShardReadError, match=shard.name):
        load_image(raws[0], shard.name)


def test_decode_npy_orders_versions_and_bytes():
    import io

    from numpy.lib import format as npy_format

    for array, version in [
        (np.asfortranarray(np.arange(24.0).reshape(2, 3, 4)), (1, 0)),
        (np.arange(10, dtype=">i4"), (2, 0)),
        (np.zeros((0, 3), dtype=np.float16), (1, 0)),
    ]:
        buf = io.BytesIO()
        npy_format.write_array(buf, array, version=version)
        got = decode_npy(np.frombuffer(bytearray(buf.getvalue()), dtype=np.uint8))
        assert got.dtype == array.dtype and got.shape == array.shape
        assert np.array_equal(got, array)
        from_bytes = load_image({"img.npy": buf.getvalue()})
        assert from_bytes.flags.writeable and np.array_equal(from_bytes, array)
    with pytest.raises(ShardReadError, match=r"x\.tar: img\.npy is not a readable"):
        load_image({"img.npy": buf.getvalue()[:-4]}, "x.tar")  # data cut short
