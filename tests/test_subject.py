"""Access (show/export) and rectification for one data subject."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from foundation.governance import audit, subject
from foundation.governance.cli import add_parsers
from foundation.governance.erase import apply_erasure
from foundation.governance.merge import merge
from foundation.governance.toy import ToyDataset, build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest
from foundation.shards.reader import iter_samples
from foundation.shards.verify import verify_manifest


@pytest.fixture
def toy(tmp_path: Path) -> ToyDataset:
    return build_toy_dataset(tmp_path / "ds", n_patients=8, shard_max_samples=4)


def samples_of(manifest: Path, pseudo: str) -> dict[str, object]:
    return {s.key: s for s in iter_samples(manifest) if s.meta["patient"] == pseudo}


def test_show_lists_the_persons_samples_only(toy: ToyDataset) -> None:
    pid = toy.patient_ids[2]
    expected = samples_of(toy.manifest, toy.key.patient(pid))
    report = subject.find_subject(toy.manifest, [toy.key], pid)
    assert {s.key for s in report.samples} == set(expected) and len(expected) == 4
    assert report.studies == sorted({s.meta["study"] for s in expected.values()})
    assert report.modalities == ["CT", "XR"] and report.versions == [1]
    assert {s.study_date for s in report.samples} == {
        s.meta["study_date"] for s in expected.values()
    }
    m = Manifest.load(toy.manifest)
    assert set(report.shards) == {r.path for r in m.shards if toy.key.patient(pid) in r.patients}
    assert subject.find_subject(toy.manifest, [toy.key], "NOT-A-PATIENT").samples == []
    entries = audit.read(audit.default_log_path(toy.manifest))
    assert [e["action"] for e in entries] == ["subject show", "subject show"]
    assert entries[0]["samples"] == 4 and pid not in json.dumps(entries)


def test_cli_never_prints_the_patient_id(toy: ToyDataset, capsys, monkeypatch) -> None:
    key_file = toy.root / "key.txt"
    key_file.write_text("toy-secret-key-0123456789abcdef\n")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    pid = toy.patient_ids[1]
    for argv in (["--patient-id", pid], ["--patient-id", "-"]):
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO(pid + "\n"))
        args = parser.parse_args(
            ["subject", "show", "--manifest", str(toy.manifest), "--key-file", str(key_file), *argv]
        )
        assert args.handler(args) == 0
        out = capsys.readouterr()
        assert pid not in out.out + out.err and "samples" in out.out


def test_export_writes_images_meta_and_reports(toy: ToyDataset, tmp_path: Path) -> None:
    pid = toy.patient_ids[4]
    expected = samples_of(toy.manifest, toy.key.patient(pid))
    out = tmp_path / "export"
    subject.export_subject(toy.manifest, [toy.key], pid, out, image_format="nifti")
    summary = json.loads((out / "subject.json").read_text())
    assert {s["key"] for s in summary["samples"]} == set(expected)
    for key, s in expected.items():
        folder = out / key
        assert json.loads((folder / "meta.json").read_text()) == s.meta
        assert (folder / "report.txt").read_text() == s.report
        if s.image.ndim == 3:
            img = nib.load(folder / "image.nii.gz")
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert np.array_equal(np.asarray(img.dataobj), s.image)
        else:
            assert np.array_equal(np.load(folder / "image.npy"), s.image)
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "subject.json"])


def test_after_erasure_nothing_is_found(toy: ToyDataset) -> None:
    pid = toy.patient_ids[0]
    lst = ExclusionList(
        [ExclusionEntry(toy.key.patient(pid), "erasure", "2025-03-01")], key_id=toy.key.key_id
    )
    apply_erasure(toy.manifest, [lst])
    report = subject.find_subject(toy.manifest, [toy.key], pid)
    assert report.samples == [] and report.versions == [] and report.version == 2


def test_access_across_centres_hashes_with_each_key(tmp_path: Path) -> None:
    a = build_toy_dataset(tmp_path / "a", n_patients=3, dataset="ca", id_prefix="X")
    b = build_toy_dataset(
        tmp_path / "b",
        n_patients=3,
        dataset="cb",
        id_prefix="X",
        secret=b"centre-b-secret-0123456789",
    )
    merged = tmp_path / "dm" / "all.json"
    merge([a.manifest, b.manifest], merged)
    # the same hospital ID at both centres: two pseudonyms, one per key, both found
    report = subject.find_subject(merged, [a.key, b.key], "X00001")
    assert report.keys_matched == 2 and len(report.samples) == 8
    only_a = subject.find_subject(merged, [a.key], "X00001")
    assert len(only_a.samples) == 4


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["accession_number", "study", "field", "value"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_rectify_rewrites_the_studys_shards(toy: ToyDataset, tmp_path: Path) -> None:
    pid = toy.patient_ids[5]
    pseudo = toy.key.patient(pid)
    before = {s.key: s for s in iter_samples(toy.manifest)}
    study0 = toy.key.pseudonym("study", f"{pid}/0")
    study1 = toy.key.pseudonym("study", f"{pid}/1")
    m1 = Manifest.load(toy.manifest)
    holding = {
        r.path
        for r in m1.shards
        if any(k.startswith(study0 + "_") or k.startswith(study1 + "_") for k in r.keys)
    }
    shas = {r.path: r.sha256 for r in m1.shards}
    rows = [
        {
            "accession_number": toy.accession(pid, 0),
            "field": "report",
            "value": "Rapport corrigé : nodule de 4 mm.",
        },
        {"study": study1, "field": "body_part", "value": "ABDOMEN"},
        {"study": study1, "field": "patient", "value": "x"},  # not rectifiable
        {"study": "0" * 24, "field": "sex", "value": "F"},  # unknown study
    ]
    result, bad = subject.rectify(toy.manifest, write_csv(tmp_path / "r.csv", rows), toy.key)
    assert result is not None and result.to_version == 2
    assert sorted(line for line, _ in bad) == [4, 5]
    m2 = Manifest.load(toy.manifest)
    assert verify_manifest(m2).ok
    after = {s.key: s for s in iter_samples(m2)}
    assert set(after) == set(before)
    for key, s in after.items():
        old = before[key]
        if s.meta["study"] == study0:
            assert s.report == "Rapport corrigé : nodule de 4 mm." and s.meta == old.meta
        elif s.meta["study"] == study1:
            assert s.meta["body_part"] == "ABDOMEN" and s.report == old.report
        else:
            assert s.meta == old.meta and s.report == old.report
        assert np.array_equal(s.image, old.image) and s.meta["patient"] == old.meta["patient"]
    assert {r.path: r.sha256 for r in m2.shards if r.path in shas} == {
        p: d for p, d in shas.items() if p not in holding
    }
    assert result.shards_rewritten == len(holding) and result.samples_changed == 4
    assert pseudo in m2.patients()
    entry = audit.read(audit.default_log_path(toy.manifest))[-1]
    assert entry["action"] == "subject rectify" and entry["studies"] == 2


def test_rectify_csv_without_selector_is_refused(toy: ToyDataset, tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("field,value\nreport,x\n")
    with pytest.raises(subject.SubjectError, match=r"bad\.csv"):
        subject.rectify(toy.manifest, p, toy.key)
