"""Ingest with an exclusion list: a listed patient's series never reach shards, manifest or logs."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import demo_ingest_config, ingest_argv, write_test_key

from foundation.cli import main
from foundation.ingest import pipeline
from foundation.ingest.pipeline import run_ingest
from foundation.privacy.exclusion import ExclusionEntry, ExclusionError, ExclusionList
from foundation.privacy.pseudonym import load_key
from foundation.shards.manifest import Manifest
from foundation.shards.reader import iter_samples


@dataclass
class Listed:
    patient_id: str  # raw, from the cohort's truth: what must never be written
    pseudonym: str
    series: int  # the patient's image series in the cohort's truth
    identifiers: list[str]  # every value planted for the patient (names, UIDs, accessions)
    exclusion: ExclusionList
    list_path: Path


def _listed(ingested, tmp: Path) -> Listed:
    """The cohort's patient with the most series, in a list saved under the test key."""
    truth = json.loads(Path(ingested.cohort.truth_json).read_text(encoding="utf-8"))
    series = Counter()
    for study in truth["studies"]:
        series[study["patient_id"]] += len(study["series"])
    patient_id, n = series.most_common(1)[0]
    assert n >= 2
    key = load_key(ingested.key_file)
    planted = json.loads(Path(ingested.cohort.planted_json).read_text(encoding="utf-8"))
    values = [v for v in planted["patients"][patient_id]["values"] if len(v.strip()) >= 4]
    entry = ExclusionEntry(key.patient(patient_id), "erasure", "2025-01-06")
    exclusion = ExclusionList([entry], key_id=key.key_id)
    exclusion.save(tmp / "exclusion_list.json")
    return Listed(patient_id, entry.pseudonym, n, values, exclusion, tmp / "exclusion_list.json")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def excluded_run(ingested, tmp_path_factory):
    """The session's cohort ingested again through the CLI with a one-patient list."""
    tmp = tmp_path_factory.mktemp("excluded")
    listed = _listed(ingested, tmp)
    out = tmp / "dataset"
    handler, root = _Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        rc = main(ingest_argv(ingested, out, "--exclusion-list", str(listed.list_path)))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert rc == 0
    summary = json.loads((out / "ingest_summary.json").read_text(encoding="utf-8"))
    return listed, out, summary, handler.messages


def _by_key(manifest: Path) -> dict[str, tuple]:
    return {
        s.key: (s.meta["patient"], s.report, json.dumps(s.meta, sort_keys=True), s.image.tobytes())
        for s in iter_samples(manifest, decode_image=True)
    }


def _ingest_listed(ingested, listed, out: Path):
    """The session cohort ingested again into ``out`` with ``listed``'s exclusion list."""
    return run_ingest(
        ingested.cohort.export_dir,
        out,
        reports_csv=ingested.cohort.reports_csv,
        config=demo_ingest_config(),
        key_file=ingested.key_file,
        exclusion_list=listed.list_path,
    )


def test_listed_patient_is_absent_and_the_others_unchanged(ingested, excluded_run):
    listed, _, summary, _ = excluded_run
    manifest = Manifest.load(summary["manifest"])
    before, after = _by_key(ingested.result.manifest_path), _by_key(Path(summary["manifest"]))
    assert any(v[0] == listed.pseudonym for v in before.values())  # the patient was there
    assert listed.pseudonym not in {v[0] for v in after.values()}
    assert listed.pseudonym not in manifest.patients()
    # every other patient's samples are byte-identical, under the same keys
    assert after == {k: v for k, v in before.items() if v[0] != listed.pseudonym}
    assert summary["samples"] == len(after) == manifest.num_samples


def test_excluded_count_is_the_patients_series(ingested, excluded_run):
    listed, _, summary, _ = excluded_run
    base = ingested.result.to_dict()
    assert summary["skipped_by_reason"]["excluded"] == listed.series
    assert summary["series_seen"] == base["series_seen"]  # seen, then left out
    assert summary["samples"] == base["samples"] - listed.series
    others = {r: n for r, n in summary["skipped_by_reason"].items() if r != "excluded"}
    assert others == base["skipped_by_reason"]


def test_listed_series_are_never_read(ingested, tmp_path, monkeypatch):
    listed = _listed(ingested, tmp_path)
    read: list[str | None] = []
    real = pipeline.process_series

    def recording(task, ctx):  # workers=1: every series is read here, in this process
        read.append(task.patient)
        return real(task, ctx)

    monkeypatch.setattr(pipeline, "process_series", recording)
    res = _ingest_listed(ingested, listed, tmp_path / "out")
    assert len(read) == res.series_seen - listed.series
    assert listed.pseudonym not in read and None not in read  # every series had its patient


def test_list_version_recorded_and_nothing_names_the_patient(excluded_run):
    listed, out, summary, logs = excluded_run
    manifest_text = Path(summary["manifest"]).read_text(encoding="utf-8")
    assert json.loads(manifest_text)["exclusion_version"] == listed.exclusion.version
    assert summary["exclusion_version"] == listed.exclusion.version
    written = {
        "manifest": manifest_text,
        "summary": json.dumps(summary),
        "ledger": (out / "ledger.jsonl").read_text(encoding="utf-8"),
        "logs": "\n".join(logs),
    }
    assert any("left out" in m for m in logs)  # the stage did log, by count
    needles = [listed.pseudonym, listed.patient_id, *listed.identifiers]
    leaks = [(n, w) for n in needles for w, text in written.items() if n.lower() in text.lower()]
    assert not leaks, f"{len(leaks)} identifiers of the listed patient written, e.g. {leaks[:2]}"


def test_without_a_list_nothing_is_excluded(ingested):
    summary = ingested.result.to_dict()
    assert "excluded" not in summary["skipped_by_reason"]
    assert summary["exclusion_version"] is None
    assert Manifest.load(ingested.result.manifest_path).exclusion_version is None


def test_guard_drops_a_listed_patient_the_header_check_missed(ingested, tmp_path, monkeypatch):
    listed = _listed(ingested, tmp_path)
    real = pipeline._header_ids
    # the first header names nobody: only the guard on the pseudonymised sample can catch it
    monkeypatch.setattr(pipeline, "_header_ids", lambda ref, key: (real(ref, key)[0], None))
    res = _ingest_listed(ingested, listed, tmp_path / "out")
    assert res.skipped["excluded"] == listed.series
    # the guard's counts enter the ledger (the header check's do not): it did the work
    ledger = [json.loads(x) for x in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert sum(g["skipped"].get("excluded", 0) for g in ledger) > 0
    assert res.samples == ingested.result.samples - listed.series
    assert listed.pseudonym not in Manifest.load(res.manifest_path).patients()


def test_unusable_list_fails_before_anything_is_written(ingested, tmp_path):
    other = write_test_key(tmp_path / "other.key", secret="another-secret-for-tests-0123456")
    lst = ExclusionList([ExclusionEntry("p" * 16, "opposition", "2025-01-06")])
    lst.key_id = load_key(other).key_id
    lst.save(tmp_path / "other_list.json")
    for bad in (tmp_path / "other_list.json", tmp_path / "missing.json"):
        with pytest.raises(ExclusionError) as err:
            run_ingest(
                ingested.cohort.export_dir,
                tmp_path / "out",
                config=demo_ingest_config(),
                key_file=ingested.key_file,
                exclusion_list=bad,
            )
        assert str(bad) in str(err.value)
        assert not (tmp_path / "out").exists()


def test_resume_over_shards_holding_a_listed_patient_is_refused(ingested, tmp_path):
    listed = _listed(ingested, tmp_path)
    out = tmp_path / "earlier"
    shutil.copytree(ingested.out, out)  # a finished ingest made before the request
    manifest = ingested.out / "data_manifests" / ingested.result.manifest_path.name
    before = (out / "data_manifests" / manifest.name).read_bytes()
    with pytest.raises(ExclusionError, match="optout apply") as err:
        run_ingest(
            ingested.cohort.export_dir,
            out,
            reports_csv=ingested.cohort.reports_csv,
            config=demo_ingest_config(shard_max_samples=4),
            key_file=ingested.key_file,
            exclusion_list=listed.list_path,
        )
    assert listed.pseudonym not in str(err.value)
    assert (out / "data_manifests" / manifest.name).read_bytes() == before  # left as it was
