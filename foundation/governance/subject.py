"""Access (GDPR art. 15) and rectification (art. 16) for one data subject.

Access: the patient ID given by the requester is hashed with the key(s) and never printed;
the manifest says which shards hold the pseudonym, only those are read. For a dataset merged
from several centres the ID is hashed with each centre's key (``keys``: one per centre, each
used only on the shards made under it); a request may also be answered per centre.

Rectification: a CSV of ``accession_number`` (raw, hashed in namespace "accession") or
``study`` (pseudonym), ``field`` (``report`` or one of ``RECTIFIABLE``), ``value``; the shards
holding those studies are rewritten as a new dataset version through the same journal as
erasure. A corrected report is scrubbed like an ingested one; a corrected ``study_date`` needs
a ``patient_id`` column (raw, hashed) to be shifted with the patient's offset.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foundation.governance import audit, redact, rewrite
from foundation.governance.dataset_lock import dataset_lock
from foundation.governance.erase import check_not_revoked
from foundation.governance.merge import manifest_key_ids, shard_key_id
from foundation.privacy.pseudonym import PseudonymKey
from foundation.shards.manifest import Manifest
from foundation.shards.reader import decode_meta, decode_report, iter_shard, load_image

RECTIFIABLE = frozenset({"report", "body_part", "sex", "age_years", "study_date"})


class SubjectError(ValueError):
    """A subject request cannot be answered (names the file and the reason, never an ID)."""


@dataclass
class SubjectSample:
    key: str
    study: str
    study_date: str | None
    modality: str
    body_part: str | None
    shape: list[int]
    shard: str
    has_report: bool


@dataclass
class SubjectReport:
    """What the dataset holds for one person (pseudonyms only)."""

    dataset: str
    version: int
    keys_matched: int  # keys given that the dataset uses
    samples: list[SubjectSample] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # manifest versions holding the person

    @property
    def studies(self) -> list[str]:
        return sorted({s.study for s in self.samples})

    @property
    def shards(self) -> list[str]:
        return sorted({s.shard for s in self.samples})

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.samples})

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "version": self.version,
            "versions": self.versions,
            "studies": self.studies,
            "shards": self.shards,
            "modalities": self.modalities,
            "samples": [asdict(s) for s in self.samples],
        }


def _pseudonyms(manifest: Manifest, keys: list[PseudonymKey], patient_id: str) -> dict[str, str]:
    """key_id -> the person's pseudonym under that key, for the keys the dataset uses."""
    used = manifest_key_ids(manifest)
    out = {k.key_id: k.patient(patient_id) for k in keys if k.key_id in used}
    if not out:
        raise SubjectError(f"{manifest.location}: none of the given keys built this dataset")
    return out


def _iter_subject(manifest: Manifest, pseudonyms: dict[str, str]):
    """(record, raw sample) of the person, reading only the shards that hold them."""
    for rec, path in zip(manifest.shards, manifest.shard_paths(), strict=True):
        pseudo = pseudonyms.get(shard_key_id(manifest, rec))
        if pseudo is None or pseudo not in rec.patients:
            continue
        for raw in iter_shard(str(path)):
            if decode_meta(raw, path.name).get("patient") == pseudo:
                yield rec, path, raw


def _versions_holding(path: Path, manifest: Manifest, pseudonyms: set[str]) -> list[int]:
    versions = []
    for _, m in redact.iter_manifests(path.resolve().parent, sorted(pseudonyms)):
        if m.dataset == manifest.dataset and pseudonyms & m.patients():
            versions.append(m.version)
    return sorted(set(versions))


def _audit_access(path: Path, log: str | Path | None, action: str, r: SubjectReport) -> None:
    audit.append(
        log or audit.default_log_path(path),
        action,
        dataset=r.dataset,
        version=r.version,
        keys_matched=r.keys_matched,
        samples=len(r.samples),
        studies=len(r.studies),
        found=bool(r.samples),
    )


def find_subject(
    manifest_path: str | Path,
    keys: list[PseudonymKey],
    patient_id: str,
    *,
    audit_log: str | Path | None = None,
) -> SubjectReport:
    """Samples, studies, shifted dates, modalities, shards and versions of one person.

    The request is recorded in the audit log (counts only; default: next to the manifest).
    """
    report = _find(Path(manifest_path), keys, patient_id)
    _audit_access(Path(manifest_path), audit_log, "subject show", report)
    return report


def _find(path: Path, keys: list[PseudonymKey], patient_id: str) -> SubjectReport:
    manifest = Manifest.load(path)
    check_not_revoked(manifest)
    pseudonyms = _pseudonyms(manifest, keys, patient_id)
    report = SubjectReport(manifest.dataset, manifest.version, len(pseudonyms))
    for rec, _, raw in _iter_subject(manifest, pseudonyms):
        meta = decode_meta(raw)
        report.samples.append(
            SubjectSample(
                key=raw["__key__"],
                study=meta.get("study", ""),
                study_date=meta.get("study_date"),
                modality=meta.get("modality", "?"),
                body_part=meta.get("body_part"),
                shape=list(meta.get("shape", [])),
                shard=rec.path,
                has_report=bool(decode_report(raw).strip()),
            )
        )
    report.versions = _versions_holding(path, manifest, set(pseudonyms.values()))
    return report


def export_subject(
    manifest_path: str | Path,
    keys: list[PseudonymKey],
    patient_id: str,
    out_dir: str | Path,
    *,
    image_format: str = "npy",
    audit_log: str | Path | None = None,
) -> SubjectReport:
    """Write the person's data to ``out_dir``: per sample ``<key>/image.npy`` (or
    ``image.nii.gz`` for 3D with ``image_format="nifti"``, RAS affine from the spacing),
    ``meta.json`` and ``report.txt``; and ``subject.json`` (the access report)."""
    if image_format not in ("npy", "nifti"):
        raise SubjectError(f"unknown image format {image_format!r} (npy or nifti)")
    report = _find(Path(manifest_path), keys, patient_id)
    manifest = Manifest.load(manifest_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for _, path, raw in _iter_subject(manifest, _pseudonyms(manifest, keys, patient_id)):
        folder = out / raw["__key__"]
        folder.mkdir(exist_ok=True)
        image, meta = load_image(raw, path.name), decode_meta(raw, path.name)
        if image_format == "nifti" and image.ndim == 3:
            import nibabel as nib

            affine = np.diag([*map(float, meta.get("spacing", [1.0] * 3)), 1.0])  # RAS axes
            nib.save(nib.Nifti1Image(np.asarray(image), affine), folder / "image.nii.gz")
        else:
            np.save(folder / "image.npy", image, allow_pickle=False)
        (folder / "meta.json").write_text(
            json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (folder / "report.txt").write_text(decode_report(raw), encoding="utf-8")
    (out / "subject.json").write_text(
        json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8"
    )
    _audit_access(Path(manifest_path), audit_log, "subject export", report)
    return report


# -- rectification ------------------------------------------------------------------------


@dataclass
class Rectification:
    line: int
    field: str
    value: Any
    study: str | None = None  # pseudonym, when given or resolved
    accession: str | None = None  # pseudonym, resolved to a study by reading the shards
    patient: str | None = None  # pseudonym, when a patient_id column is given


def _parse_value(name: str, raw: str, key: PseudonymKey, patient_id: str) -> Any:
    if name == "age_years":
        return min(int(raw), 90)
    if name == "sex":
        value = raw.strip().upper() or None
        if value not in ("M", "F", "O", None):
            raise ValueError("sex must be M, F, O or empty")
        return value
    if name == "study_date":
        if not patient_id:
            raise ValueError("study_date needs a patient_id column to shift the date")
        return key.shift_date(patient_id, dt.date.fromisoformat(raw.strip())).isoformat()
    if name == "report":
        from foundation.privacy.scrub import scrub_report

        shift = key.date_shift_days(patient_id) if patient_id else None
        return scrub_report(raw, shift_days=shift)
    return raw.strip()


def read_rectifications(
    csv_path: str | Path, key: PseudonymKey
) -> tuple[list[Rectification], list[tuple[int, str]]]:
    """Parse the CSV: (rectifications, bad rows as (line, reason)); IDs hashed, never kept."""
    csv_path = Path(csv_path)
    rows: list[Rectification] = []
    bad: list[tuple[int, str]] = []
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            if not {"field", "value"} <= cols or not cols & {"accession_number", "study"}:
                raise SubjectError(
                    f"{csv_path}: needs columns field, value and accession_number or study"
                )
            for row in reader:
                name = (row.get("field") or "").strip()
                acc = (row.get("accession_number") or "").strip()
                study = (row.get("study") or "").strip()
                pid = (row.get("patient_id") or "").strip()
                if name not in RECTIFIABLE:
                    bad.append((reader.line_num, f"field not rectifiable: {name!r}"))
                    continue
                if not acc and not study:
                    bad.append((reader.line_num, "no accession_number nor study"))
                    continue
                try:
                    value = _parse_value(name, row.get("value") or "", key, pid)
                except ValueError as e:
                    bad.append((reader.line_num, f"bad value ({e})"))
                    continue
                rows.append(
                    Rectification(
                        reader.line_num,
                        name,
                        value,
                        study=study or None,
                        accession=key.pseudonym("accession", acc) if acc else None,
                        patient=key.patient(pid) if pid else None,
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SubjectError(f"{csv_path}: cannot read ({e.__class__.__name__})") from None
    return rows, bad


def _study_index(manifest: Manifest) -> dict[str, tuple[str, str, set[str]]]:
    """accession pseudonym -> (study, patient, shard paths), reading every shard's meta."""
    index: dict[str, tuple[str, str, set[str]]] = {}
    for rec, path in zip(manifest.shards, manifest.shard_paths(), strict=True):
        for raw in iter_shard(str(path)):
            meta = decode_meta(raw, path.name)
            acc = meta.get("accession")
            if acc:
                entry = index.setdefault(acc, (meta["study"], meta["patient"], set()))
                entry[2].add(rec.path)
    return index


def rectify(
    manifest_path: str | Path,
    csv_path: str | Path,
    key: PseudonymKey,
    *,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> tuple[rewrite.RewriteResult | None, list[tuple[int, str]]]:
    """Apply the CSV's corrections as a new dataset version; returns (result, bad rows).

    Holds the dataset's lock throughout (``DatasetLockedError`` past ``lock_wait`` seconds)."""
    with dataset_lock(manifest_path, wait=lock_wait, operation="subject rectify"):
        return _rectify(Path(manifest_path), csv_path, key, audit_log)


def _rectify(
    path: Path, csv_path: str | Path, key: PseudonymKey, audit_log: str | Path | None
) -> tuple[rewrite.RewriteResult | None, list[tuple[int, str]]]:
    log = Path(audit_log) if audit_log is not None else audit.default_log_path(path)
    if rewrite.pending(path) is not None:
        rewrite.run(path, audit_log=log)
    manifest = Manifest.load(path)
    check_not_revoked(manifest)
    rows, bad = read_rectifications(csv_path, key)
    by_study: dict[str, set[str]] = defaultdict(set)  # study -> shards
    for rec in manifest.shards:
        for k in rec.keys or ():
            by_study[k.rsplit("_", 1)[0]].add(rec.path)
    needs_scan = any(r.accession for r in rows) or any(r.keys is None for r in manifest.shards)
    acc_index = _study_index(manifest) if needs_scan else {}
    if needs_scan:
        by_study = defaultdict(set)
        for study, _, shards in acc_index.values():
            by_study[study] |= shards
    changes: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        study = r.study or (acc_index.get(r.accession, (None,))[0] if r.accession else None)
        if study is None or study not in by_study:
            bad.append((r.line, "study not in the dataset"))
            continue
        holders = {
            p for rec in manifest.shards if rec.path in by_study[study] for p in rec.patients
        }
        if r.patient is not None and r.patient not in holders:
            bad.append((r.line, "patient_id does not match the study"))
            continue
        changes[study][r.field] = r.value
    if not changes:
        return None, bad
    affected = sorted({p for s in changes for p in by_study[s]})
    order = {rec.path: i for i, rec in enumerate(manifest.shards)}
    journal = rewrite.Journal(
        op="rectify",
        manifest=path.name,
        from_version=manifest.version,
        to_version=manifest.version + 1,
        affected=sorted(affected, key=order.__getitem__),
        params={"changes": dict(changes)},
        audit={
            "action": "subject rectify",
            "studies": len(changes),
            "fields": sorted({f for c in changes.values() for f in c}),
            "rows_rejected": len(bad),
        },
        exclusion_version=manifest.exclusion_version,
        audit_log=str(log),
    )
    rewrite.start(path, journal)
    return rewrite.run(path, audit_log=log), bad
