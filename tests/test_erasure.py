"""Erasure applied to the shards: only the shards that hold the patient change, a new version is
published, nothing keeps the patient's samples or pseudonym, and a killed run resumes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from foundation.governance import audit, rewrite
from foundation.governance.erase import RevokedManifestError, apply_erasure, check_not_revoked
from foundation.governance.merge import MergeError, merge
from foundation.governance.toy import ToyDataset, build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest, ManifestError
from foundation.shards.reader import iter_samples
from foundation.shards.verify import verify_manifest


def exclusion(ds: ToyDataset, *ids_types: tuple[str, str]) -> ExclusionList:
    entries = [ExclusionEntry(ds.key.patient(pid), t, "2025-01-02") for pid, t in ids_types]
    return ExclusionList(entries, key_id=ds.key.key_id)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def samples_by_patient(manifest: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in iter_samples(manifest, decode_image=False):
        out.setdefault(s.meta["patient"], set()).add(s.key)
    return out


@pytest.fixture
def toy(tmp_path: Path) -> ToyDataset:
    return build_toy_dataset(tmp_path / "ds", n_patients=12, shard_max_samples=4)


def check_erased(ds: ToyDataset, before: dict[str, set[str]], erased: str, version: int) -> None:
    """The dataset is verified, at ``version``, without ``erased`` anywhere, others intact."""
    m = Manifest.load(ds.manifest)
    assert m.version == version and m.revoked_by is None
    assert verify_manifest(m).ok, verify_manifest(m).summary()
    after = samples_by_patient(ds.manifest)
    pseudo = ds.key.patient(erased)
    assert after == {p: k for p, k in before.items() if p != pseudo}
    needles = [pseudo.encode(), *(k.encode() for k in before[pseudo])]
    for path, data in all_bytes(ds.root):
        assert not any(n in data for n in needles), f"{path} still holds the erased patient"
    assert not rewrite.journal_path(ds.manifest).exists()
    assert not list(ds.root.rglob("*.tmp")) and not list(ds.root.rglob(".rewrite-*"))


def test_erasure_rewrites_only_the_patients_shards(toy: ToyDataset) -> None:
    m1 = Manifest.load(toy.manifest)
    before = samples_by_patient(toy.manifest)
    target = toy.patient_ids[3]
    pseudo = toy.key.patient(target)
    holding = {r.path for r in m1.shards if pseudo in r.patients}
    untouched = {r.path: sha(m1.shard_dir / r.path) for r in m1.shards if r.path not in holding}
    assert holding and untouched

    # an opposition alone is filtered at read time, not erased; the erasure is
    lst = exclusion(toy, (target, "erasure"), (toy.patient_ids[5], "opposition"))
    out = apply_erasure(toy.manifest, [lst])

    assert out.patients_erased == 1 and out.version == 2
    assert out.shards_rewritten == len(holding)
    assert out.samples_removed == len(before[pseudo])
    check_erased(toy, before, target, version=2)
    m2 = Manifest.load(toy.manifest)
    assert m2.exclusion_version == lst.version
    assert m2.extra["history"][-1]["shards_rewritten"] == len(holding)
    for path, digest in untouched.items():  # byte-identical, same record
        assert sha(m2.shard_dir / path) == digest
    assert not any((m1.shard_dir / p).exists() for p in holding)  # superseded shards removed
    # the old version stays readable, revoked, and names the version to use instead
    old = Manifest.load(rewrite.archive_path(toy.manifest, 1))
    assert old.revoked_by == 2 and old.version == 1
    with pytest.raises(RevokedManifestError, match=r"use version 2 \(toy\.json"):
        check_not_revoked(old)
    check_not_revoked(m2)
    # re-applying the same list changes nothing; opposition is erased only on request
    assert apply_erasure(toy.manifest, [lst]).version == 2
    out3 = apply_erasure(toy.manifest, [lst], include_opposition=True)
    assert out3.version == 3 and out3.patients_erased == 1
    entries = [e for e in audit.read(audit.default_log_path(toy.manifest))]
    assert [e["to_version"] for e in entries] == [2, 2, 3]
    assert audit.verify(audit.default_log_path(toy.manifest)).ok


def _fail_on_call(n: int, fn):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("injected")
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "target, nth",
    [
        ("rewrite_shard", 2),  # mid-rewrite: one shard done, the next one not
        ("_verify_new", 1),  # all new shards written, not verified
        ("Manifest.save", 1),  # commit: before the old version is archived
        ("Manifest.save", 2),  # commit: archived, current manifest not replaced
        ("_cleanup", 1),  # committed, superseded shards not deleted
        ("redact_ledgers", 1),  # shards deleted, ledgers not redacted
        ("audit.append", 1),  # cleaned, audit entry not written
    ],
)
def test_killed_erasure_resumes_to_a_verified_dataset(
    toy: ToyDataset, monkeypatch: pytest.MonkeyPatch, target: str, nth: int
) -> None:
    before = samples_by_patient(toy.manifest)
    erased = toy.patient_ids[7]
    lst = exclusion(toy, (erased, "erasure"))
    if target == "Manifest.save":
        monkeypatch.setattr(Manifest, "save", _fail_on_call(nth, Manifest.save))
    elif target == "audit.append":
        monkeypatch.setattr(audit, "append", _fail_on_call(nth, audit.append))
    else:
        monkeypatch.setattr(rewrite, target, _fail_on_call(nth, getattr(rewrite, target)))
    with pytest.raises(KeyboardInterrupt):
        apply_erasure(toy.manifest, [lst])
    # whatever the phase, the manifest on disk is a usable dataset with its shards present
    assert verify_manifest(Manifest.load(toy.manifest)).ok
    monkeypatch.undo()
    apply_erasure(toy.manifest, [lst])
    check_erased(toy, before, erased, version=2)
    log = audit.default_log_path(toy.manifest)
    assert [e["to_version"] for e in audit.read(log)] == [2]  # one entry, not one per attempt
    assert audit.verify(log).ok


def test_list_under_another_key_is_refused(toy: ToyDataset, tmp_path: Path) -> None:
    other = build_toy_dataset(tmp_path / "other", n_patients=2, secret=b"another-secret-0123456789")
    with pytest.raises(ManifestError, match=r"another|key"):
        apply_erasure(toy.manifest, [exclusion(other, (other.patient_ids[0], "erasure"))])
    assert Manifest.load(toy.manifest).version == 1


def test_erasure_across_merged_centres(tmp_path: Path) -> None:
    a = build_toy_dataset(tmp_path / "a", n_patients=5, dataset="ca", site="A", id_prefix="A")
    b = build_toy_dataset(tmp_path / "b", n_patients=5, dataset="cb", site="B", id_prefix="B",
                          secret=b"centre-b-secret-0123456789")  # fmt: skip
    merged_path = tmp_path / "data_manifests" / "all.json"
    merged = merge([a.manifest, b.manifest], merged_path)
    assert merged.num_samples == 40 and len(merged.extra["sources"]) == 2
    assert set(merged.extra["shard_key_ids"].values()) == {a.key.key_id, b.key.key_id}
    before = samples_by_patient(merged_path)
    assert sum(map(len, before.values())) == 40
    with pytest.raises(RevokedManifestError, match="merged into"):
        check_not_revoked(Manifest.load(a.manifest))

    erased = a.patient_ids[1]
    out = apply_erasure(merged_path, [exclusion(a, (erased, "erasure"))])
    assert out.version == 2 and out.patients_erased == 1
    m = Manifest.load(merged_path)
    assert verify_manifest(m).ok
    after = samples_by_patient(merged_path)
    assert after == {p: k for p, k in before.items() if p != a.key.patient(erased)}
    pseudo = a.key.patient(erased).encode()
    for root in (tmp_path / "a", tmp_path / "b", tmp_path / "data_manifests"):
        for path, data in all_bytes(root):
            assert pseudo not in data, path
    # part a now points at deleted shards: revoked, naming the merged manifest
    with pytest.raises(RevokedManifestError, match=r"all\.json"):
        check_not_revoked(Manifest.load(a.manifest))
    assert set(m.extra["shard_key_ids"]) == {r.path for r in m.shards}


def test_a_merge_records_the_parts_built_without_an_exclusion_list(tmp_path: Path) -> None:
    a = build_toy_dataset(tmp_path / "a", n_patients=2, dataset="ca", site="A", id_prefix="A")
    b = build_toy_dataset(tmp_path / "b", n_patients=2, dataset="cb", site="B", id_prefix="B")
    c = build_toy_dataset(tmp_path / "c", n_patients=2, dataset="cc", site="C", id_prefix="C")
    neither = merge([a.manifest, b.manifest], tmp_path / "ab.json")
    assert neither.exclusion_version is None
    # b and c as if ingested with an exclusion list; a and b released from the first merge
    for ds, version in ((a, None), (b, "v-b"), (c, "v-c")):
        m = Manifest.load(ds.manifest)
        m.exclusion_version = version
        m.extra.pop("merged_into", None)
        m.save(ds.manifest)
    mixed = merge([a.manifest, b.manifest, c.manifest], tmp_path / "abc.json")
    # not "v-b+v-c": part a's shards were never filtered
    assert mixed.exclusion_version == "none+v-b+v-c"
    by_part = {s["dataset"]: s["exclusion_version"] for s in mixed.extra["sources"]}
    assert by_part == {"ca": None, "cb": "v-b", "cc": "v-c"}


def test_merge_refuses_duplicate_samples(tmp_path: Path) -> None:
    a = build_toy_dataset(tmp_path / "a", n_patients=3)
    b = build_toy_dataset(tmp_path / "b", n_patients=3)  # same key, same ids: same sample keys
    with pytest.raises(MergeError, match="duplicate"):
        merge([a.manifest, b.manifest], tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
