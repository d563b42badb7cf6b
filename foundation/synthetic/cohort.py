"""The synthetic cohort: patients, studies at several dates, series, reports, labels, opt-outs.

``generate_cohort(out, n_patients, seed)`` writes (layout relied on by ingest and tests):
- ``export/``: DICOM files (nested meaningless folders, some without extension) and NIfTI
  files ``*.nii.gz`` each with a ``<stem>.json`` sidecar of DICOM-keyword identifiers;
- ``reports.csv`` (accession_number, report), one per study but one or two left out;
- ``optout_requests.csv`` (patient_id, request_type, date_received);
- ``labels.csv`` (accession_number, patient_id, calcium_score, cardiothoracic_ratio,
  cardiomegaly);
- ``planted_identifiers.json``: every identifier value planted per patient, the labelled
  identifier spans of each report, and the objects ingest must skip;
- ``cohort.json``: ground truth per study and series (geometry, format, anatomy).

Same seed, same bytes: every random draw comes from generators seeded by (seed, patient),
UIDs are hashes of the seed, and nothing reads the clock.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from foundation.synthetic.anatomy import Anatomy, calcium_score, sample_patient
from foundation.synthetic.dicom_writer import SeriesInfo, StudyInfo
from foundation.synthetic.geometry import CT_ORIENTATIONS, draw_ct_stack, oblique_stack
from foundation.synthetic.identities import (
    PatientIdentity,
    date_forms,
    identity_values,
    make_patient,
)
from foundation.synthetic.reports import StudyFacts, write_report
from foundation.synthetic.series import CT_STORAGE, ExportLayout, StudyWriter

# Variants cycle with the cohort's series counters so even a 4-patient cohort holds each one.
CT_FORMATS = ("explicit", "j2k", "rle", "implicit", "nifti", "explicit")
XR_FORMATS = ("explicit", "rle", "j2k", "explicit", "implicit")
MR_FORMATS = ("explicit", "nifti", "j2k")
XR_SHAPES = ((256, 220), (256, 256), (256, 240))
CT_SCANNERS = (
    ("SIEMENS", "SOMATOM Definition AS", "B30f"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD"),
    ("Philips", "iCT 256", "B"),
    ("CANON_MEC", "Aquilion ONE", "FC13"),
)
MR_SCANNERS = (("SIEMENS", "MAGNETOM Aera", 1.5), ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5),
               ("Philips", "Ingenia", 3.0))  # fmt: skip
XR_SCANNERS = {"CR": ("FUJIFILM Corporation", "FCR PROFECT"),
               "DX": ("Carestream Health", "DRX-Evolution")}  # fmt: skip
DESCRIPTIONS = {
    "CT": ("TDM THORAX SANS INJECTION", "Thorax 5mm Parenchyme"),
    "XR": ("RADIO THORAX FACE", "Thorax PA"),
    "MR": ("IRM CARDIAQUE", "SAX cine SSFP"),
}


@dataclass
class CohortSummary:
    """What ``generate_cohort`` wrote: counts and where the files are."""

    out: Path
    export_dir: Path
    reports_csv: Path
    optout_csv: Path
    labels_csv: Path
    planted_json: Path
    truth_json: Path
    patients: int = 0
    studies: int = 0
    series: int = 0  # image series ingest should keep (skipped objects not counted)
    dicom_files: int = 0  # every DICOM file written, skipped objects included
    nifti_files: int = 0
    total_bytes: int = 0
    expected_skips: list[dict] = field(default_factory=list)


@dataclass
class _Counters:
    ct: int = 0
    xr: int = 0
    mr: int = 0


def _uid_factory(seed: int) -> Callable[..., str]:
    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["foundation-synthetic", str(seed), *map(str, parts)])

    return uid


def _plan_studies(i: int, rng: np.random.Generator) -> list[str]:
    """Study kinds of patient ``i`` in date order; the first three patients cover every kind."""
    extra = []
    if i == 0 or (i > 2 and rng.random() < 0.5):
        extra.append("XR")
    if i == 1 or (i > 2 and rng.random() < 0.25):
        extra.append("MR")
    if i == 2 or (i > 2 and rng.random() < 0.3):
        extra.append("CT")
    rng.shuffle(extra)
    return ["CT", *extra]


def _series_info(kind: str, modality: str, study: StudyInfo, uid, number: int, rng, **acq):
    p = study.ident
    h = p.hospital
    if kind == "CT":
        maker, model, kernel = CT_SCANNERS[int(rng.integers(len(CT_SCANNERS)))]
        acq = {"KVP": int(rng.choice([100, 120])), "ConvolutionKernel": kernel,
               "ExposureTime": int(rng.integers(400, 900)),
               "XRayTubeCurrent": int(rng.integers(80, 300)), **acq}  # fmt: skip
    elif kind == "MR":
        maker, model, tesla = MR_SCANNERS[int(rng.integers(len(MR_SCANNERS)))]
        acq = {"MagneticFieldStrength": tesla, "RepetitionTime": round(float(rng.uniform(2.8, 3.6)), 2),
               "EchoTime": round(float(rng.uniform(1.2, 1.6)), 2), "FlipAngle": 55,
               "ScanningSequence": "GR", "SequenceVariant": "SS", "MRAcquisitionType": "2D", **acq}  # fmt: skip
    else:
        maker, model = XR_SCANNERS.get(modality, ("SIEMENS", "Ysio Max"))
        acq = {"KVP": int(rng.choice([110, 120, 125])),
               "ExposureTime": int(rng.integers(5, 30)), **acq}  # fmt: skip
    return SeriesInfo(
        uid=uid("series", study.uid, number),
        number=number,
        modality=modality,
        description=DESCRIPTIONS.get(kind, ("", kind))[1],
        body_part="HEART" if kind == "MR" else "CHEST",
        frame_uid=uid("frame", study.uid, number),
        manufacturer=maker,
        model=model,
        station=f"{h.short.upper()}-{kind}{int(rng.integers(1, 4)):02d}",
        serial=f"SN{int(rng.integers(10**5, 10**6))}",
        acquisition=acq,
        plant_other_ids=bool(rng.random() < 0.5),
    )


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_patient(out, layout, ident, anat_model, i, rng, uid, counters, ct_matrix, skips):
    """Write every study of one patient; returns (studies truth, planted values, reports)."""
    kinds = _plan_studies(i, rng)
    day0 = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    dates = [day0]
    for _ in kinds[1:]:
        dates.append(dates[-1] + dt.timedelta(days=int(rng.integers(60, 700))))
    values = identity_values(ident)
    studies, reports = [], []
    for j, (kind, date) in enumerate(zip(kinds, dates, strict=True)):
        stage = j / max(1, len(kinds) - 1)
        a: Anatomy = anat_model.at(stage)
        study = StudyInfo(
            ident=ident,
            uid=uid("study", i, j),
            accession=f"{date.year % 100:02d}{int(rng.integers(10**5, 10**6))}{i:03d}{j}",
            date=date,
            time=f"{int(rng.integers(8, 19)):02d}{int(rng.integers(0, 60)):02d}00",
            description=DESCRIPTIONS[kind][0],
            study_id=f"E{int(rng.integers(10**6, 10**7))}",
            charset="ISO_IR 192" if rng.random() < 0.5 else "ISO_IR 100",
        )
        w = StudyWriter(out, layout, study, rng, uid)
        series = []
        if kind == "CT":
            c = counters.ct
            counters.ct += 1
            if i == 0 and j == 0:  # a scout before the CT, as scanners store it
                info = _series_info("CT", "CT", study, uid, 1, rng)
                info.description = "Topogramme"
                skips.append({"path": w.localizer(a, info, max(32, ct_matrix)),
                              "reason": "localizer"})  # fmt: skip
            stack = draw_ct_stack(rng, ct_matrix, CT_ORIENTATIONS[c % len(CT_ORIENTATIONS)])
            info = _series_info("CT", "CT", study, uid, 2, rng)
            fmt = CT_FORMATS[c % len(CT_FORMATS)]
            storage = tuple(CT_STORAGE)[c % len(CT_STORAGE)]
            if fmt == "nifti":  # alternate uint16 + scl_inter -1024 and plain int16 HU
                storage = ("uint12", "int16")[(c // len(CT_FORMATS)) % 2]
            series.append(w.ct(a, info, stack, fmt, storage))
        elif kind == "MR":
            c = counters.mr
            counters.mr += 1
            normal = np.array([0.5, -0.45, -0.7]) + rng.normal(0, 0.05, 3)
            stack = oblique_stack(max(32, ct_matrix), int(rng.integers(6, 11)), 8.0,
                                  np.array(a.heart_centre), normal, 300.0)  # fmt: skip
            info = _series_info("MR", "MR", study, uid, 1, rng)
            series.append(w.mr(a, info, stack, MR_FORMATS[c % len(MR_FORMATS)]))
        else:
            c = counters.xr
            counters.xr += 1
            modality = ("DX", "CR")[c % 2]
            info = _series_info("XR", modality, study, uid, 1, rng)
            photometric = ("MONOCHROME1", "MONOCHROME2", "MONOCHROME2")[c % 3]
            fmt = XR_FORMATS[c % len(XR_FORMATS)]
            series.append(w.radiograph(a, info, XR_SHAPES[c % 3], fmt, photometric))
        facts = StudyFacts(kind, date, study.accession, a, dates[j - 1] if j else None)
        text, spans = write_report(ident, facts, rng, english=bool(rng.random() < 0.1))
        if i == 1 and j == 0:  # a screen capture with burned-in text
            info = _series_info("SC", "OT", study, uid, 99, rng)
            skips.append({"path": w.skip_object(info), "reason": "burned_in_annotation"})
        if i == 2 and j == 0:  # a structured report: not an image
            info = _series_info("SR", "SR", study, uid, 98, rng)
            findings = text.split("\n\n")[-3]
            skips.append({"path": w.skip_object(info, findings), "reason": "non_image_sop"})
        values += [study.accession, study.uid, study.study_id, *date_forms(date), *w.planted]
        values += [sp["text"] for sp in spans]
        studies.append({
            "patient_id": ident.ipp, "accession_number": study.accession,
            "study_instance_uid": study.uid, "kind": kind, "date": date.isoformat(),
            "anatomy": _anatomy_truth(a), "series": series,
        })  # fmt: skip
        reports.append((study.accession, text, spans))
    return studies, values, reports


def _anatomy_truth(a: Anatomy) -> dict:
    return {
        "ctr": round(a.ctr, 4),
        "calcium_score": calcium_score(a),
        "heart_centre": list(a.heart_centre),
        "heart_semi": list(a.heart_semi),
        "thorax_half": a.thorax_half,
        "lung_centres": [list(c) for c in a.lung_centres],
        "lung_semi": [a.lung_semi_x, *a.lung_semi_yz],
        "body_semi": list(a.body_semi),
        "spine": [0.0, a.spine_y, a.spine_radius],
        "calcifications": [[*c.centre, c.radius, c.hu] for c in a.calcifications],
        "nodules": [[*n.centre, n.radius] for n in a.nodules],
    }


def generate_cohort(
    out: Path, n_patients: int = 40, seed: int = 0, *, ct_matrix: int = 96, progress: bool = False
) -> CohortSummary:
    """Write a synthetic PACS export, reports, labels and opt-outs under ``out``."""
    if n_patients < 1 or ct_matrix < 16:
        raise ValueError("need n_patients >= 1 and ct_matrix >= 16")
    out = Path(out)
    export = out / "export"
    if export.exists() and any(export.iterdir()):
        raise FileExistsError(f"{export}: not empty; refusing to mix two cohorts")
    export.mkdir(parents=True, exist_ok=True)
    uid = _uid_factory(seed)
    counters, skips = _Counters(), []
    all_studies, planted, reports, idents = [], {}, [], []
    patients = range(n_patients)
    if progress:
        from rich.progress import track

        patients = track(patients, description="synthetic cohort")
    for i in patients:
        rng = np.random.default_rng([seed, i])
        ident: PatientIdentity = make_patient(rng, i)
        idents.append(ident)
        layout = ExportLayout(export, i % 3, np.random.default_rng([seed, i, 1]))
        studies, values, reps = _write_patient(
            out, layout, ident, sample_patient(rng), i, rng, uid, counters, ct_matrix, skips
        )
        all_studies += studies
        reports += reps
        # Dates also listed apart: a shifted date may equal another study's original date, so
        # privacy tests should check dates per patient, not against every patient's dates.
        dates = set(date_forms(ident.birth_date))
        dates |= {f for s in studies for f in date_forms(dt.date.fromisoformat(s["date"]))}
        dates |= {sp["text"] for _, _, spans in reps for sp in spans if "DATE" in sp["label"]}
        planted[ident.ipp] = {"values": sorted(set(values)), "dates": sorted(dates)}
    junk = export / "DICOM" / "README.TXT"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_text("Export PACS - ne pas modifier\n")
    skips.append({"path": junk.relative_to(out).as_posix(), "reason": "not_dicom"})
    return _write_tables(
        out, seed, n_patients, ct_matrix, all_studies, planted, reports, idents, skips
    )


def _write_tables(out, seed, n_patients, ct_matrix, studies, planted, reports, idents, skips):
    # Leave out the report of one study (two from 20 studies on): "study without a report".
    n_missing = 1 if len(reports) < 20 else 2
    missing = {reports[-1 - 7 * k][0] for k in range(n_missing) if 7 * k < len(reports)}
    rows = [[acc, text] for acc, text, _ in reports if acc not in missing]
    (out / "reports.csv").write_text(_csv_text(["accession_number", "report"], rows), "utf-8")
    label_rows = []
    for s in studies:
        ctr = s["anatomy"]["ctr"]
        s["has_report"] = s["accession_number"] not in missing
        label_rows.append([s["accession_number"], s["patient_id"], s["anatomy"]["calcium_score"],
                           ctr, int(ctr > 0.5)])  # fmt: skip
    header = ["accession_number", "patient_id", "calcium_score", "cardiothoracic_ratio",
              "cardiomegaly"]  # fmt: skip
    (out / "labels.csv").write_text(_csv_text(header, label_rows), "utf-8")
    rng = np.random.default_rng([seed, 999_983])
    n_opt = max(1 if n_patients >= 4 else 0, round(0.1 * n_patients))
    chosen = sorted(rng.choice(n_patients, size=n_opt, replace=False).tolist()) if n_opt else []
    opt_rows = [[idents[k].ipp, ("opposition", "erasure")[n % 2],
                 (dt.date(2025, 1, 6) + dt.timedelta(days=int(rng.integers(0, 120)))).isoformat()]
                for n, k in enumerate(chosen)]  # fmt: skip
    (out / "optout_requests.csv").write_text(
        _csv_text(["patient_id", "request_type", "date_received"], opt_rows), "utf-8"
    )
    all_values = sorted({v for p in planted.values() for v in p["values"]})
    planted_doc = {
        "patients": planted,
        "all_values": all_values,
        "reports": {acc: spans for acc, _, spans in reports if acc not in missing},
        "expected_skips": skips,
    }
    _dump(out / "planted_identifiers.json", planted_doc)
    files = [p for p in (out / "export").rglob("*") if p.is_file()]
    n_nifti = sum(p.name.endswith(".nii.gz") for p in files)
    n_dicom = len(files) - 2 * n_nifti - 1  # every other file but the README is DICOM
    summary = CohortSummary(
        out=out,
        export_dir=out / "export",
        reports_csv=out / "reports.csv",
        optout_csv=out / "optout_requests.csv",
        labels_csv=out / "labels.csv",
        planted_json=out / "planted_identifiers.json",
        truth_json=out / "cohort.json",
        patients=n_patients,
        studies=len(studies),
        series=sum(len(s["series"]) for s in studies),
        dicom_files=n_dicom,
        nifti_files=n_nifti,
        expected_skips=skips,
    )
    counts = {k: getattr(summary, k) for k in ("patients", "studies", "series", "dicom_files",
                                               "nifti_files")}  # fmt: skip
    truth = {"seed": seed, "ct_matrix": ct_matrix, "counts": counts, "studies": studies,
             "expected_skips": skips}  # fmt: skip
    _dump(out / "cohort.json", truth)
    summary.total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return summary


def _dump(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", "utf-8")
