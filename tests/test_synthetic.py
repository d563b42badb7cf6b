"""The synthetic cohort: valid files, consistent geometry, labels that match the images."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.errors import InvalidDicomError

from foundation.synthetic import generate_cohort
from foundation.synthetic.nifti_writer import SIDECAR_KEYS

N_PATIENTS, SEED, MATRIX = 6, 7, 48


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(out, N_PATIENTS, SEED, ct_matrix=MATRIX)
    truth = json.loads((out / "cohort.json").read_text("utf-8"))
    return out, summary, truth


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _series(truth: dict, **match):
    for study in truth["studies"]:
        for s in study["series"]:
            if all(s.get(k) == v for k, v in match.items()):
                yield study, s


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _ct_lps(out: Path, paths: list[str]):
    """HU volume indexed (x, y, z) in LPS order, voxel centre of [0, 0, 0], spacing."""
    dss = [pydicom.dcmread(out / p) for p in paths]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    ps = [float(v) for v in dss[0].PixelSpacing]
    dz = float(
        np.dot(dss[1].ImagePositionPatient, normal) - np.dot(dss[0].ImagePositionPatient, normal)
    )
    # array axes (slice, row, col) run along (normal, col, row); put them in x, y, z order
    dirs, steps = [normal, col, row], [dz, ps[0], ps[1]]
    order = [int(np.argmax([abs(d[w]) for d in dirs])) for w in range(3)]
    vol = vol.transpose(order)
    origin = np.array(dss[0].ImagePositionPatient, dtype=float)
    spacing = np.zeros(3)
    for w, ax in enumerate(order):
        sign = np.sign(dirs[ax][w])
        spacing[w] = steps[ax]
        if sign < 0:  # flip so the index increases along +x/+y/+z
            vol = np.flip(vol, w)
            origin[w] -= (vol.shape[w] - 1) * steps[ax]
    return vol, origin, spacing


def _at(vol, origin, spacing, point) -> float:
    idx = np.rint((np.asarray(point) - origin) / spacing).astype(int)
    assert np.all(idx >= 0) and np.all(idx < vol.shape), f"probe {point} outside the volume"
    return float(vol[tuple(idx)])


def _probes(anat: dict) -> tuple[list, list]:
    """Points that must be soft tissue/bone and points that must be lung or not bone."""
    (hx, hy, hz), (ax, _, _) = anat["heart_centre"], anat["heart_semi"]
    spine_y = anat["spine"][1]
    dense = [[hx + 0.6 * ax, hy, hz], [0.0, spine_y, hz]]  # left heart, spine (posterior)
    light = [[-(hx + 0.6 * ax), hy, hz], anat["lung_centres"][0]]  # their mirror: right lung
    return dense, light


def test_counts_and_layout(cohort):
    out, summary, truth = cohort
    assert summary.patients == N_PATIENTS
    assert summary.studies == len(truth["studies"]) >= N_PATIENTS
    files = [p for p in (out / "export").rglob("*") if p.is_file()]
    niftis = [p for p in files if p.name.endswith(".nii.gz")]
    assert len(niftis) == summary.nifti_files >= 1
    for nii in niftis:
        assert nii.with_name(nii.name[: -len(".nii.gz")] + ".json").is_file()
    dicoms = [p for p in files if not p.name.endswith((".nii.gz", ".json", ".TXT"))]
    assert len(dicoms) == summary.dicom_files
    assert any(p.suffix == "" for p in dicoms), "some DICOM files must lack an extension"
    assert any(p.suffix == ".dcm" for p in dicoms)
    assert summary.series == sum(len(s["series"]) for s in truth["studies"])
    modalities = {s["modality"] for _, s in _series(truth)}
    assert {"CT", "MR"} <= modalities and modalities & {"CR", "DX"}


def test_every_dicom_reads_and_decodes(cohort):
    out, summary, _ = cohort
    skips = {s["path"]: s["reason"] for s in summary.expected_skips}
    syntaxes, photometric, sop_classes = set(), set(), set()
    for path in (out / "export").rglob("*"):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or path.name.endswith((".nii.gz", ".json")):
            continue
        if skips.get(rel) == "not_dicom":
            with pytest.raises(InvalidDicomError):
                pydicom.dcmread(path)
            continue
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM", f"{rel}: no Part 10 preamble"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
        sop_classes.add(ds.SOPClassUID.name)
        if "PixelData" in ds:
            arr = ds.pixel_array
            assert arr.shape == (ds.Rows, ds.Columns) and arr.std() > 0
            photometric.add(ds.PhotometricInterpretation)
    assert {"JPEG 2000 Image Compression (Lossless Only)", "RLE Lossless"} <= syntaxes
    assert {"Explicit VR Little Endian", "Implicit VR Little Endian"} <= syntaxes
    assert {"MONOCHROME1", "MONOCHROME2"} <= photometric
    assert {"CT Image Storage", "MR Image Storage"} <= sop_classes


def test_ct_geometry_matches_pixels(cohort):
    out, _, truth = cohort
    variants = set()
    for study, s in _series(truth, modality="CT"):
        if s["format"] == "nifti":
            continue
        variants.add(s["orientation"])
        dss = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in s["paths"]]
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        row, col = iop[:3], iop[3:]
        assert abs(np.dot(row, col)) < 1e-6 and np.allclose([row @ row, col @ col], 1)
        normal = np.cross(row, col)
        pos = np.sort([np.dot(d.ImagePositionPatient, normal) for d in dss])
        assert np.allclose(np.diff(pos), s["slice_spacing"], atol=1e-3)
        assert float(dss[0].SliceThickness) == pytest.approx(s["slice_spacing"])
        assert [float(v) for v in dss[0].PixelSpacing] == pytest.approx(s["pixel_spacing"])
        vol, origin, spacing = _ct_lps(out, s["paths"])
        dense, light = _probes(study["anatomy"])
        values = [_at(vol, origin, spacing, p) for p in dense + light]
        assert min(values[:2]) > -200 and max(values[2:]) < -500, (s["orientation"], values)
    assert variants >= {"standard", "reverse", "feet_first", "prone"}, variants


def test_mr_stack_and_radiographs(cohort):
    out, _, truth = cohort
    for _, s in _series(truth, modality="MR", format="dicom"):
        dss = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in s["paths"]]
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        assert abs(normal[2]) < 0.99  # oblique, short-axis-like
        pos = np.sort([np.dot(d.ImagePositionPatient, normal) for d in dss])
        assert np.allclose(np.diff(pos), s["slice_spacing"], atol=1e-3)
    for _, s in _series(truth, format="dicom"):
        if s["modality"] not in ("CR", "DX"):
            continue
        ds = pydicom.dcmread(out / s["paths"][0])
        assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(s["imager_pixel_spacing"])
        if s["pixel_spacing"] is not None:
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx(s["pixel_spacing"])
        arr = ds.pixel_array.astype(float)
        air, chest = arr[0, 0], arr[arr.shape[0] // 2, arr.shape[1] // 2]  # neck corner: air
        # MONOCHROME1 stores air (black on display) as the highest value
        assert (air > chest) == (ds.PhotometricInterpretation == "MONOCHROME1")


def test_nifti_affine_and_sidecar(cohort):
    out, _, truth = cohort
    found = 0
    for study, s in _series(truth, format="nifti"):
        found += 1
        img = nib.load(out / s["paths"][0])
        ps, dz = s["pixel_spacing"], s["slice_spacing"]
        assert nib.affines.voxel_sizes(img.affine) == pytest.approx([ps[1], ps[0], dz], abs=1e-3)
        sidecar = json.loads((out / s["sidecar"]).read_text("utf-8"))
        assert set(SIDECAR_KEYS) <= set(sidecar)
        assert sidecar["PatientID"] == study["patient_id"]
        assert sidecar["SeriesInstanceUID"] == s["uid"]
        if s["modality"] == "CT":
            data, inv = img.get_fdata(), np.linalg.inv(img.affine)
            dense, light = _probes(study["anatomy"])
            for points, ok in ((dense, lambda v: v > -200), (light, lambda v: v < -500)):
                for p in points:
                    ras = np.array([-p[0], -p[1], p[2], 1.0])  # LPS -> RAS
                    assert ok(data[tuple(np.rint(inv @ ras)[:3].astype(int))])
    assert found >= 1


def test_csv_tables(cohort):
    out, _, truth = cohort
    accessions = [s["accession_number"] for s in truth["studies"]]
    cols, reports = _rows(out / "reports.csv")
    assert cols == ["accession_number", "report"]
    assert 1 <= len(accessions) - len(reports) <= 2  # a study or two without a report
    assert {r["accession_number"] for r in reports} < set(accessions)
    assert all(len(r["report"]) > 200 for r in reports)
    cols, labels = _rows(out / "labels.csv")
    assert cols == ["accession_number", "patient_id", "calcium_score", "cardiothoracic_ratio",
                    "cardiomegaly"]  # fmt: skip
    assert [r["accession_number"] for r in labels] == accessions
    for r in labels:
        ctr = float(r["cardiothoracic_ratio"])
        assert 0.38 <= ctr <= 0.62 and float(r["calcium_score"]) >= 0
        assert int(r["cardiomegaly"]) == int(ctr > 0.5)
    cols, optout = _rows(out / "optout_requests.csv")
    assert cols == ["patient_id", "request_type", "date_received"]
    assert len(optout) >= 1
    patients = {s["patient_id"] for s in truth["studies"]}
    assert all(r["patient_id"] in patients for r in optout)
    assert {r["request_type"] for r in optout} <= {"opposition", "erasure"}


def test_planted_identifiers_cover_headers_and_reports(cohort):
    out, _, truth = cohort
    planted = json.loads((out / "planted_identifiers.json").read_text("utf-8"))
    _, reports = _rows(out / "reports.csv")
    text = {r["accession_number"]: r["report"] for r in reports}
    assert set(planted["reports"]) == set(text)
    labels = {"NOM", "PRENOM", "IPP", "NDA", "DATE", "DATE_NAISSANCE", "TEL", "HOPITAL"}
    seen = set()
    for acc, spans in planted["reports"].items():
        for sp in spans:
            assert text[acc][sp["start"] : sp["end"]] == sp["text"]
            seen.add(sp["label"])
    assert labels <= seen
    keywords = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName",
                "ReferringPhysicianName", "OperatorsName", "PatientAddress", "StationName")  # fmt: skip
    by_series = {s["uid"]: st["patient_id"] for st, s in _series(truth)}
    for _, s in _series(truth, format="dicom"):
        values = set(planted["patients"][by_series[s["uid"]]]["values"])
        ds = pydicom.dcmread(out / s["paths"][0], stop_before_pixels=True)
        for kw in keywords:
            assert str(ds[kw].value) in values, kw
        assert str(ds.RequestAttributesSequence[0].RequestingPhysician) in values
        private = ds[0x0009, 0x1010].value  # the private block's copy of the name
        if isinstance(private, bytes):  # implicit VR: an unknown private tag reads as UN bytes
            encoding = convert_encodings(ds.SpecificCharacterSet)[0]
            private = private.decode(encoding).strip()
        assert private in values
    for patient in planted["patients"].values():
        assert set(patient["dates"]) <= set(patient["values"])
    assert set(planted["all_values"]) >= {
        v for p in planted["patients"].values() for v in p["values"]
    }


def test_expected_skips(cohort):
    out, summary, _ = cohort
    reasons = {s["reason"]: out / s["path"] for s in summary.expected_skips}
    assert set(reasons) == {"localizer", "burned_in_annotation", "non_image_sop", "not_dicom"}
    assert "LOCALIZER" in pydicom.dcmread(reasons["localizer"]).ImageType
    assert pydicom.dcmread(reasons["burned_in_annotation"]).BurnedInAnnotation == "YES"
    assert "PixelData" not in pydicom.dcmread(reasons["non_image_sop"])


def test_labels_relate_to_images(cohort):
    out, _, truth = cohort
    scores, calcium, ctr_label, ctr_seen = [], [], [], []
    for study, s in _series(truth, modality="CT", format="dicom"):
        a = study["anatomy"]
        vol, origin, spacing = _ct_lps(out, s["paths"])
        grid = np.stack(np.meshgrid(*[origin[w] + spacing[w] * np.arange(vol.shape[w])
                                      for w in range(3)], indexing="ij"), -1)  # fmt: skip
        inside = (((grid - a["heart_centre"]) / a["heart_semi"]) ** 2).sum(-1) <= 1
        scores.append(a["calcium_score"])
        calcium.append(float(np.clip(vol[inside] - 130, 0, None).sum()))
        # CTR: heart run along x through the heart centre / lung span through the lung centres
        i, j, k = np.rint((np.array(a["heart_centre"]) - origin) / spacing).astype(int)
        line = vol[:, j, k] > -300
        lo, hi = i, i
        while line[lo - 1]:
            lo -= 1
        while line[hi + 1]:
            hi += 1
        _, j0, k0 = np.rint((np.array(a["lung_centres"][0]) - origin) / spacing).astype(int)
        body = np.flatnonzero(vol[:, j0, k0] > -500)
        lung = np.flatnonzero(vol[body[0] : body[-1], j0, k0] < -500)
        ctr_seen.append((hi - lo + 1) / (lung[-1] - lung[0] + 1))
        ctr_label.append(a["ctr"])
    scores, calcium = np.array(scores), np.array(calcium)
    assert np.all((scores == 0) == (calcium == 0)), (scores, calcium)
    # Lesions smaller than a voxel are drawn diluted (partial volume): the order is loose on a
    # coarse grid, but a study with over three times another's score must show more calcium.
    assert scores.max() > 0 and _spearman(scores, calcium) > 0.5, (scores, calcium)
    for s1, c1 in zip(scores, calcium, strict=True):
        assert all(c1 > c2 for s2, c2 in zip(scores, calcium, strict=True) if s1 > 3 * s2), (
            scores,
            calcium,
        )
    assert np.abs(np.array(ctr_seen) - ctr_label).max() < 0.07, (ctr_seen, ctr_label)
    assert np.corrcoef(ctr_label, ctr_seen)[0, 1] > 0.8, (ctr_seen, ctr_label)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_cohort(tmp_path / "a", 3, 11, ct_matrix=24)
    b = generate_cohort(tmp_path / "b", 3, 11, ct_matrix=24)
    c = generate_cohort(tmp_path / "c", 3, 12, ct_matrix=24)
    ha, hb, hc = _hashes(a.out), _hashes(b.out), _hashes(c.out)
    assert ha == hb
    assert ha["labels.csv"] != hc["labels.csv"]
    images = {k: v for k, v in ha.items() if k.startswith("export/") and not k.endswith(".TXT")}
    assert set(images.values()).isdisjoint(hc.values())


def test_refuses_a_non_empty_export(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        generate_cohort(tmp_path, 1, 0, ct_matrix=16)
