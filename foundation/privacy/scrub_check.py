"""Measure report scrubbing on an export whose planted identifiers are known.

Each report is scrubbed exactly as the ingest does it: with the deny-list of its own study's
DICOM header and its patient's date shift. Recall and precision per label are computed by
``scrub.evaluate_scrubber`` against the spans that the synthetic cohort records as planted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pydicom

from foundation.ingest.discover import find_dicom_files
from foundation.privacy.deid import identifier_values
from foundation.privacy.pseudonym import PseudonymKey, load_key
from foundation.privacy.scrub import evaluate_scrubber


def study_deny_lists(
    export_dir: Path, key: PseudonymKey
) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Per accession number: the header deny-list and the patient's date shift (memory only)."""
    deny: dict[str, set[str]] = {}
    shift: dict[str, int] = {}
    for path in find_dicom_files(export_dir):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # unreadable files are the ingest's business, not this check's
            continue
        acc = str(ds.get("AccessionNumber", "")).strip()
        if not acc:
            continue
        deny.setdefault(acc, set()).update(identifier_values(ds))
        shift[acc] = key.date_shift_days(str(ds.get("PatientID", "")).strip())
    for sidecar in export_dir.rglob("*.json"):
        try:
            ids = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(ids, dict) or not ids.get("AccessionNumber"):
            continue
        ds = pydicom.Dataset()
        for k, v in ids.items():
            try:
                setattr(ds, k, v)
            except Exception:
                continue
        acc = str(ids["AccessionNumber"]).strip()
        deny.setdefault(acc, set()).update(identifier_values(ds))
        shift[acc] = key.date_shift_days(str(ids.get("PatientID", "")).strip())
    return deny, shift


def scrub_figures(cohort: Any, key_file: Path) -> dict[str, Any]:
    """Recall/precision of scrubbing on a synthetic cohort (``CohortSummary``)."""
    key = load_key(key_file)
    with open(cohort.reports_csv, newline="", encoding="utf-8") as f:
        reports = {r["accession_number"]: r["report"] for r in csv.DictReader(f)}
    planted = json.loads(Path(cohort.planted_json).read_text(encoding="utf-8"))["reports"]
    deny, shift = study_deny_lists(Path(cohort.export_dir), key)
    result = evaluate_scrubber(reports, planted, deny=deny, shift_days=shift)
    per_label = {
        label: {"recall": _round(r["recall"]), "precision": _round(r["precision"])}
        for label, r in sorted(result["per_label"].items())
    }
    return {
        "reports": result["reports"],
        "recall": _round(result["recall"]),
        "precision": _round(result["precision"]),
        "leaks": len(result["leaks"]),
        "per_label": per_label,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)
