"""Shard writer, manifest, verification and sequential reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest, ManifestError
from foundation.shards.reader import iter_samples
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
