"""The ingest end to end: privacy of everything it writes, stable pseudonyms, parts, resume."""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_SECRET, demo_ingest_config, write_test_key

from foundation.ingest import pipeline
from foundation.ingest.pipeline import parse_part, run_ingest
from foundation.privacy.pseudonym import MissingKeyError
from foundation.shards.reader import iter_samples
from foundation.shards.verify import verify_manifest


def _texts(root: Path) -> dict[str, str]:
    """Every text an ingest wrote: files, tar members (meta, report) and .npy headers."""
    out: dict[str, str] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    data = tar.extractfile(m).read()
                    if m.name.endswith(".npy"):
                        data = data[:256]  # the header; the payload is pixels
                    out[f"{path.name}:{m.name}"] = data.decode("utf-8", "replace")
        else:
            out[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return out


def _planted(cohort) -> list[str]:
    planted = json.loads(Path(cohort.planted_json).read_text(encoding="utf-8"))
    return sorted({v for v in planted["all_values"] if len(v.strip()) >= 4})


def _original_dates(cohort) -> set[str]:
    planted = json.loads(Path(cohort.planted_json).read_text(encoding="utf-8"))
    return {v for v in planted["all_values"] if len(v) == 10 and v[4] == "-" and v[7] == "-"}


def test_no_planted_identifier_in_any_byte_written(ingested, caplog):
    assert ingested.result.samples > 0
    texts = _texts(ingested.out)
    assert any(k.endswith("report.txt") for k in texts) and any("meta.json" in k for k in texts)
    # a shifted date may equal another patient's real date by chance: dates are checked below
    dates = _original_dates(ingested.cohort)
    values = [v for v in _planted(ingested.cohort) if v not in dates]
    assert len(values) > 50
    leaks = [(v, where) for v in values for where, t in texts.items() if v.lower() in t.lower()]
    assert not leaks, f"{len(leaks)} planted identifiers reached the output, e.g. {leaks[:3]}"
    assert TEST_SECRET not in "".join(texts.values())


def test_study_dates_are_shifted_per_patient(ingested):
    from foundation.privacy.pseudonym import load_key

    key = load_key(ingested.key_file)
    planted = json.loads(Path(ingested.cohort.planted_json).read_text(encoding="utf-8"))
    own_dates = {  # each patient's own original ISO dates, by pseudonym
        key.patient(pid): {v for v in p.get("dates", p["values"]) if len(v) == 10 and v[4] == "-"}
        for pid, p in planted["patients"].items()
    }
    checked = 0
    for s in iter_samples(ingested.result.manifest_path, decode_image=False):
        if s.meta.get("study_date"):
            assert s.meta["study_date"] not in own_dates[s.meta["patient"]]
            checked += 1
    assert checked > 0


def test_logs_and_exceptions_hold_no_identifier(small_cohort, tmp_path, caplog):
    key = write_test_key(tmp_path / "k.key")
    with caplog.at_level(logging.DEBUG):
        run_ingest(
            small_cohort.export_dir,
            tmp_path / "out",
            reports_csv=small_cohort.reports_csv,
            config=demo_ingest_config(),
            key_file=key,
        )
    log_text = "\n".join(r.getMessage() for r in caplog.records).lower()
    values = [v for v in _planted(small_cohort) if v not in _original_dates(small_cohort)]
    assert not [v for v in values if v.lower() in log_text]


def test_manifest_verifies_and_counts(ingested):
    report = verify_manifest(ingested.result.manifest_path)
    assert report.ok, report.summary()
    samples = list(iter_samples(ingested.result.manifest_path, decode_image=True))
    assert len(samples) == ingested.result.samples
    assert Counter(s.meta["modality"] for s in samples) == ingested.result.by_modality
    assert {"CT", "XR"} <= set(ingested.result.by_modality)
    # what the cohort planted to be skipped is skipped, with a reason
    assert sum(ingested.result.skipped.values()) >= len(ingested.cohort.expected_skips) - 1
    for s in samples:
        s.validate()
        assert "_" in s.key and "." not in s.key
        if s.meta["modality"] == "CT":
            assert s.image.dtype == np.int16 and s.meta["orientation"] == "RAS"
        else:
            assert s.image.dtype == np.float16


def test_study_without_report_is_ingested_and_counted(ingested):
    samples = list(iter_samples(ingested.result.manifest_path, decode_image=False))
    without = {s.meta["study"] for s in samples if not s.report}
    assert ingested.result.studies_without_report == len(without)
    assert any(s.report for s in samples)


def test_no_key_no_run(small_cohort, tmp_path, monkeypatch):
    monkeypatch.delenv("FOUNDATION_PSEUDONYM_KEY", raising=False)
    with pytest.raises(MissingKeyError):
        run_ingest(small_cohort.export_dir, tmp_path / "out", config=demo_ingest_config())
    assert not (tmp_path / "out").exists()


def test_a_wrong_input_folder_publishes_nothing(tmp_path):
    key = write_test_key(tmp_path / "key")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run_ingest(
            tmp_path / "nowhere", tmp_path / "out", config=demo_ingest_config(), key_file=key
        )
    assert not (tmp_path / "out").exists()
    notes = tmp_path / "notes"  # a folder, but of other files: counted in the error, no manifest
    notes.mkdir()
    (notes / "readme.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no DICOM series or NIfTI image found \(1 "):
        run_ingest(notes, tmp_path / "out", config=demo_ingest_config(), key_file=key)
    assert not list((tmp_path / "out").rglob("*.json")) and not (tmp_path / "out/shards").exists()


def _content(manifest: Path) -> dict[str, tuple]:
    return {
        s.key: (s.report, json.dumps(s.meta, sort_keys=True), s.image.tobytes())
        for s in iter_samples(manifest, decode_image=True)
    }


def test_parts_together_equal_one_run_and_pseudonyms_are_stable(ingested, tmp_path):
    key = write_test_key(tmp_path / "k.key")  # same secret as the session's ingest
    whole = _content(ingested.result.manifest_path)
    merged: dict[str, tuple] = {}
    for i in range(2):
        config = demo_ingest_config(part=parse_part(f"{i}/2"))
        res = run_ingest(
            ingested.cohort.export_dir,
            tmp_path / "parts",
            reports_csv=ingested.cohort.reports_csv,
            config=config,
            key_file=key,
        )
        part = _content(res.manifest_path)
        assert not set(part) & set(merged), "a sample landed in two parts"
        merged.update(part)
    assert merged == whole  # same keys (pseudonyms), same bytes, whatever the partition


def test_another_key_gives_other_pseudonyms(small_cohort, tmp_path):
    key = write_test_key(tmp_path / "other.key", secret="another-secret-for-tests-0123456")
    res = run_ingest(
        small_cohort.export_dir,
        tmp_path / "o",
        reports_csv=small_cohort.reports_csv,
        config=demo_ingest_config(),
        key_file=key,
    )
    ref = write_test_key(tmp_path / "ref.key")
    res_ref = run_ingest(
        small_cohort.export_dir,
        tmp_path / "r",
        reports_csv=small_cohort.reports_csv,
        config=demo_ingest_config(),
        key_file=ref,
    )
    a = {s.meta["patient"] for s in iter_samples(res.manifest_path, decode_image=False)}
    b = {s.meta["patient"] for s in iter_samples(res_ref.manifest_path, decode_image=False)}
    assert a and b and not a & b


def test_killed_ingest_resumes_without_loss_or_duplicates(ingested, tmp_path, monkeypatch):
    key = write_test_key(tmp_path / "k.key")
    out = tmp_path / "resumed"
    config = demo_ingest_config(shard_max_samples=3)
    real = pipeline._append_ledger
    calls = {"n": 0}

    def dies_on_second_group(path, entry):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after writing the 2nd group's shards
        real(path, entry)

    monkeypatch.setattr(pipeline, "_append_ledger", dies_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(
            ingested.cohort.export_dir,
            out,
            reports_csv=ingested.cohort.reports_csv,
            config=config,
            key_file=key,
        )
    monkeypatch.setattr(pipeline, "_append_ledger", real)
    res = run_ingest(
        ingested.cohort.export_dir,
        out,
        reports_csv=ingested.cohort.reports_csv,
        config=config,
        key_file=key,
    )
    assert verify_manifest(res.manifest_path).ok
    assert _content(res.manifest_path) == _content(ingested.result.manifest_path)
    # the shards of the interrupted group were rewritten, not duplicated
    on_disk = {p.name for p in (out / "shards").glob("*.tar")}
    in_manifest = {s["path"] for s in json.loads(res.manifest_path.read_text())["shards"]}
    assert in_manifest <= on_disk


def test_worker_pool_gives_the_same_shards(ingested, tmp_path):
    key = write_test_key(tmp_path / "k.key")
    res = run_ingest(
        ingested.cohort.export_dir,
        tmp_path / "pool",
        reports_csv=ingested.cohort.reports_csv,
        config=demo_ingest_config(workers=2, shard_max_samples=4),
        key_file=key,
    )
    assert _content(res.manifest_path) == _content(ingested.result.manifest_path)
    a = sorted(s["sha256"] for s in json.loads(res.manifest_path.read_text())["shards"])
    b = sorted(s["sha256"] for s in json.loads(ingested.result.manifest_path.read_text())["shards"])
    assert a == b  # byte-identical shards, whatever the number of workers


def test_bad_part_is_refused():
    for bad in ("2/2", "x/3", "1"):
        with pytest.raises(ValueError):
            parse_part(bad)
    assert parse_part("1/4") == (1, 4)


def test_corrupt_file_is_skipped_with_a_reason(small_cohort, tmp_path):
    import shutil

    export = tmp_path / "export"
    shutil.copytree(small_cohort.export_dir, export)
    victim = next(
        p
        for p in sorted(export.rglob("*"))
        if p.is_file() and p.stat().st_size > 4096 and p.read_bytes()[128:132] == b"DICM"
    )
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated mid-header or pixels
    (export / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    key = write_test_key(tmp_path / "k.key")
    res = run_ingest(
        export,
        tmp_path / "out",
        reports_csv=small_cohort.reports_csv,
        config=demo_ingest_config(),
        key_file=key,
    )
    assert res.samples > 0
    assert sum(res.skipped.values()) > len(small_cohort.expected_skips) - 1
    assert json.loads((tmp_path / "out" / "ingest_summary.json").read_text())["skipped"] >= 1
