"""Reading: discovery by content, header grouping, geometry, decoding, skip policy, NIfTI.

The synthetic series are built here with pydicom from known geometry, so every expected value
below is derived from the DICOM definitions, not copied from a run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from foundation.ingest.dicom import decode_pixels, load_series, read_dataset
from foundation.ingest.discover import SeriesRef, find_dicom_files, scan_series
from foundation.ingest.nifti import find_nifti_files, load_nifti
from foundation.ingest.preprocess import PreprocessConfig, preprocess
from foundation.ingest.skip import SkipPolicy, quiet_reading
from foundation.ingest.volume import Skip, Volume

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


# ----------------------------------------------------------------------------- builders
def _dataset(sop_class: str, rows: int, cols: int, modality: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "PAT-SECRET-42"
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_series(
    folder: Path,
    volume: np.ndarray,  # (N, rows, cols) stored values, slice k at origin + k * step_mm * normal
    iop: tuple[float, ...],
    origin: tuple[float, float, float],
    pixel_spacing: tuple[float, float],  # (row spacing, column spacing)
    step_mm: float = 2.5,
    positions: list[float] | None = None,  # distances along the normal; overrides step_mm
    study: str | None = None,
    series: str | None = None,
    **attrs: object,
) -> list[Path]:
    """Write one single-frame CT series, one file per slice, files without extension."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = study or generate_uid(), series or generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    positions = positions if positions is not None else [k * step_mm for k in range(len(volume))]
    paths = []
    for k, (plane, dist) in enumerate(zip(volume, positions, strict=True)):
        ds = _dataset(CT_STORAGE, *plane.shape, "CT")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + dist * normal]
        ds.PixelSpacing = [f"{v:.4f}" for v in pixel_spacing]
        ds.SliceThickness = "9.9"  # deliberately wrong: spacing must come from positions
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.PixelData = plane.astype(np.int16).tobytes()
        path = folder / f"slice{k:03d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _load_one(paths: list[Path], policy: SkipPolicy | None = None) -> Volume | Skip:
    refs, skips = scan_series(paths, policy or SkipPolicy())
    assert not skips and len(refs) == 1
    return load_series(refs[0], policy or SkipPolicy())


def _marker_volume(n: int, rows: int, cols: int, at: tuple[int, int, int]) -> np.ndarray:
    vol = np.zeros((n, rows, cols), dtype=np.int16)
    vol[at] = 2000
    return vol


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


# ----------------------------------------------------------------------------- geometry
def test_axial_series_affine_spacing_and_marker(tmp_path: Path) -> None:
    k, r, c = 1, 2, 3  # marker at slice 1, row 2, column 3
    vol = _marker_volume(4, 6, 5, (k, r, c))
    origin = (-50.0, -40.0, 10.0)
    paths = write_series(tmp_path / "ax", vol, AXIAL, origin, (0.8, 0.6), step_mm=2.5)
    v = _load_one(paths)
    assert isinstance(v, Volume) and v.source_format == "dicom" and v.modality == "CT"
    assert v.array.shape == (5, 6, 4)  # (X=cols, Y=rows, Z=slices)
    assert v.spacing == pytest.approx((0.6, 0.8, 2.5))  # not SliceThickness (9.9)
    assert np.unravel_index(np.argmax(v.array), v.array.shape) == (c, r, k)
    assert v.array.max() == 2000 - 1024  # rescale to HU applied
    # world position of the marker from the DICOM definition, LPS then RAS
    lps = np.asarray(origin) + c * 0.6 * np.array([1, 0, 0]) + r * 0.8 * np.array([0, 1, 0])
    lps = lps + k * 2.5 * np.array([0, 0, 1])
    ras = lps * np.array([-1, -1, 1])
    assert v.affine @ np.array([c, r, k, 1]) == pytest.approx(np.append(ras, 1))
    assert nib.aff2axcodes(v.affine) == ("L", "P", "S")
    assert "PixelData" not in v.header and v.header.PatientID == "PAT-SECRET-42"


def test_sagittal_series_orientation_and_ras_marker(tmp_path: Path) -> None:
    vol = _marker_volume(5, 4, 6, (3, 1, 4))
    origin = (30.0, -20.0, 60.0)
    paths = write_series(tmp_path / "sag", vol, SAGITTAL, origin, (2.0, 2.0), step_mm=2.0)
    v = _load_one(paths)
    assert isinstance(v, Volume)
    # row cosine +Y(LPS) = P, column cosine -Z = I, normal row x col = -X(LPS) = +R
    assert nib.aff2axcodes(v.affine) == ("P", "I", "R")
    marker_lps = np.asarray(origin) + 4 * 2.0 * np.array([0, 1, 0]) + 1 * 2.0 * np.array([0, 0, -1])
    marker_lps = marker_lps + 3 * 2.0 * np.array([-1, 0, 0])
    marker_ras = marker_lps * np.array([-1, -1, 1])
    idx = np.unravel_index(np.argmax(v.array), v.array.shape)
    assert v.affine @ np.array([*idx, 1]) == pytest.approx(np.append(marker_ras, 1))
    # after preprocessing at the native 2 mm: RAS array, marker where its world position says
    out, meta = preprocess(v, PreprocessConfig(ct_spacing=(2.0, 2.0, 2.0)))
    assert meta["orientation"] == "RAS" and meta["dims"] == 3 and out.dtype == np.int16
    corners = np.array(
        [v.affine @ np.array([i, j, kk, 1]) for i in (0, 5) for j in (0, 3) for kk in (0, 4)]
    )
    low = corners[:, :3].min(axis=0)  # RAS world of output voxel (0, 0, 0)
    expected = tuple(round(float(x)) for x in (marker_ras - low) / 2.0)
    assert np.unravel_index(np.argmax(out), out.shape) == expected


def test_slice_order_does_not_matter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 3000, size=(6, 5, 4)).astype(np.int16)
    paths = write_series(tmp_path / "s", vol, SAGITTAL, (0, 0, 0), (1.0, 1.5), step_mm=3.0)
    ref_vol = _load_one(paths)
    shuffled = paths[:]
    random.Random(1).shuffle(shuffled)
    for order in (shuffled, paths[::-1]):
        other = _load_one(order)
        assert isinstance(other, Volume)
        np.testing.assert_array_equal(other.array, ref_vol.array)
        np.testing.assert_allclose(other.affine, ref_vol.affine)
    # slices written against the normal (decreasing positions) give the same volume too
    back = write_series(
        tmp_path / "b", vol[::-1], SAGITTAL, (0, 0, 0), (1.0, 1.5), positions=[15, 12, 9, 6, 3, 0]
    )
    other = _load_one(back)
    np.testing.assert_array_equal(other.array, ref_vol.array)
    np.testing.assert_allclose(other.affine, ref_vol.affine)


@pytest.mark.parametrize(
    ("positions", "detail"),
    [([0, 2.5, 5, 10], "gap"), ([0, 2.5, 2.5, 5], "duplicate")],
)
def test_gap_or_duplicate_positions_skip(tmp_path: Path, positions: list, detail: str) -> None:
    vol = np.zeros((4, 4, 4), dtype=np.int16)
    paths = write_series(tmp_path, vol, AXIAL, (0, 0, 0), (1, 1), positions=positions)
    out = _load_one(paths)
    assert isinstance(out, Skip) and out.reason == "inconsistent_geometry"
    assert detail in out.detail


def test_mixed_sizes_split_into_series(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    a = write_series(
        tmp_path / "a", np.zeros((3, 4, 4)), AXIAL, (0, 0, 0), (1, 1), study=study, series=series
    )
    b = write_series(
        tmp_path / "b", np.zeros((3, 6, 5)), AXIAL, (0, 0, 50), (1, 1), study=study, series=series
    )
    refs, skips = scan_series(a + b)
    assert not skips and sorted(len(r.files) for r in refs) == [3, 3]
    assert len({r.split_tag for r in refs}) == 2 and all(
        isinstance(load_series(r), Volume) for r in refs
    )
    assert "1.2" not in repr(refs[0])  # UIDs stay out of repr (never logged by accident)


def test_too_few_slices_and_single_slice_policy(tmp_path: Path) -> None:
    two = write_series(tmp_path / "two", np.zeros((2, 4, 4)), AXIAL, (0, 0, 0), (1, 1))
    out = _load_one(two)
    assert isinstance(out, Skip) and out.reason == "too_few_slices"
    one = write_series(tmp_path / "one", np.ones((1, 4, 6)), AXIAL, (0, 0, 0), (0.5, 0.7))
    v = _load_one(one)
    assert isinstance(v, Volume) and v.dims == 2 and v.affine is None and v.array.shape == (4, 6)
    assert v.spacing == pytest.approx((0.5, 0.7))
    out = _load_one(one, SkipPolicy(single_slice="skip"))
    assert isinstance(out, Skip) and out.reason == "too_few_slices"
    policy = SkipPolicy.from_dict({"min_slices": 2, "xray_modalities": ["CR"]})
    assert policy.to_dict()["xray_modalities"] == ["CR"]
    assert isinstance(_load_one(two, policy), Volume)
    with pytest.raises(ValueError):
        SkipPolicy.from_dict({"single_slice": "3d"})


def test_enhanced_multiframe_matches_single_frame_series(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 2000, size=(5, 4, 6)).astype(np.int16)
    origin, spacing = (10.0, -5.0, 3.0), (0.9, 1.1)
    singles = _load_one(write_series(tmp_path / "s", vol, SAGITTAL, origin, spacing, step_mm=2.0))
    normal = np.cross(SAGITTAL[:3], SAGITTAL[3:])
    ds = _dataset(EnhancedCTImageStorage, 4, 6, "CT")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames = 5
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = [pydicom.Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = list(spacing)
    shared.PlaneOrientationSequence = [pydicom.Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(SAGITTAL)
    shared.PixelValueTransformationSequence = [pydicom.Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = "1"
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "-1024"
    ds.SharedFunctionalGroupsSequence = [shared]
    order = [3, 0, 4, 1, 2]  # frames stored out of spatial order
    per_frame = []
    for k in order:
        item = pydicom.Dataset()
        item.PlanePositionSequence = [pydicom.Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = list(
            np.asarray(origin) + 2.0 * k * normal
        )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = vol[order].astype(np.int16).tobytes()
    path = tmp_path / "enhanced"
    ds.save_as(path, enforce_file_format=True)
    refs, skips = scan_series([path])
    assert not skips and refs[0].kind == "enhanced"
    v = load_series(refs[0])
    assert isinstance(v, Volume)
    np.testing.assert_array_equal(v.array, singles.array)
    np.testing.assert_allclose(v.affine, singles.affine, atol=1e-6)


# ----------------------------------------------------------------------------- decoding
def test_rescale_applied_ct_small() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) != 0  # the file has a rescale to apply
    v = _load_one([path])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(v.array, expected)


def test_monochrome1_is_inverted() -> None:
    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/77654033/CR1"
    path = next(folder.iterdir())
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    v = _load_one([path])
    assert isinstance(v, Volume) and v.canonical_modality == "XR" and v.dims == 2
    raw = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(v.array, raw.max() + raw.min() - raw, rtol=1e-5)
    assert np.corrcoef(v.array.ravel(), raw.ravel())[0, 1] == pytest.approx(-1.0)


LOSSLESS_PAIRS = {
    "MR_small.dcm": [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
    "emri_small.dcm": [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
    "SC_rgb.dcm": ["SC_rgb_rle.dcm", "SC_rgb_expb.dcm"],
    "SC_rgb_16bit.dcm": ["SC_rgb_rle_16bit.dcm", "SC_rgb_expb_16bit.dcm"],
    "SC_rgb_small_odd.dcm": ["SC_rgb_small_odd_big_endian.dcm"],
    "693_UNCR.dcm": ["693_J2KR.dcm"],
    "MR2_UNCR.dcm": ["MR2_J2KR.dcm"],
    "RG3_UNCR.dcm": ["RG3_J2KR.dcm"],
    "US1_UNCR.dcm": ["US1_J2KR.dcm"],
    "JPEG2000_UNC.dcm": ["JPEG2000.dcm"],
}


def _decode(name: str) -> tuple[np.ndarray, str]:
    path = Path(get_testdata_file(name))
    ds = read_dataset(path)
    return decode_pixels(ds, path), UID(ds.file_meta.TransferSyntaxUID).name


def test_lossless_compressed_decodes_like_uncompressed() -> None:
    decoded: Counter[str] = Counter()
    for reference, variants in LOSSLESS_PAIRS.items():
        expected, syntax = _decode(reference)
        decoded[syntax] += 1
        for name in variants:
            got, syntax = _decode(name)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} vs {reference}")
            decoded[syntax] += 1
    print("\nlossless pairs decoded identically, by transfer syntax:")
    for syntax, n in sorted(decoded.items()):
        print(f"  {syntax:<50} {n}")
    assert {"RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)"} <= set(decoded)


def test_transfer_syntaxes_decode_or_skip_with_reason(tmp_path: Path) -> None:
    """Every pixel-bearing test file decodes, or fails as a Skip naming the syntax."""
    table: dict[str, Counter[str]] = {}
    # get_testdata_files() without a pattern: a pattern makes pydicom try to download files
    for path in [Path(f) for f in get_testdata_files() if f.endswith(".dcm")]:
        try:
            ds = read_dataset(path)
            syntax = UID(ds.file_meta.TransferSyntaxUID).name
            decode_pixels(ds, path)
            outcome = "decoded"
        except Exception as exc:  # SkipSeries: the reader's own skip
            skip = getattr(exc, "skip", None)
            assert isinstance(skip, Skip), f"{path.name}: {type(exc).__name__} escaped"
            outcome, syntax = skip.reason, locals().get("syntax", "-")
        table.setdefault(syntax, Counter())[outcome] += 1
    print("\ndecoding by transfer syntax:")
    for syntax, counts in sorted(table.items()):
        print(f"  {syntax:<50} {dict(counts)}")
    # an encapsulated syntax with no decoder plugin is a clean skip, not a crash
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path = tmp_path / "mpeg2"
    ds.save_as(path)
    out = _load_one([path])
    assert isinstance(out, Skip) and out.reason == "unsupported_transfer_syntax"


# ----------------------------------------------------------------------------- skip policy
def test_header_skips(tmp_path: Path) -> None:
    cases = {
        "localizer": {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
        "burned_in_annotation": {"BurnedInAnnotation": "YES"},
    }
    for reason, attrs in cases.items():
        paths = write_series(
            tmp_path / reason, np.zeros((3, 4, 4)), AXIAL, (0, 0, 0), (1, 1), **attrs
        )
        refs, skips = scan_series(paths)
        assert not refs and {s.reason for s in skips} == {reason}
    for name, reason in [
        ("rtstruct.dcm", "non_image_sop"),
        ("test-SR.dcm", "non_image_sop"),
        ("waveform_ecg.dcm", "non_image_sop"),
        ("rtdose.dcm", "non_image_sop"),
        ("SC_rgb.dcm", "secondary_capture"),
        ("US1_UNCR.dcm", "unsupported_modality"),
    ]:
        refs, skips = scan_series([Path(get_testdata_file(name))])
        assert not refs and [s.reason for s in skips] == [reason], name
    # secondary captures can be allowed; this one is an RGB "OT" image, still left out
    refs, skips = scan_series(
        [Path(get_testdata_file("SC_rgb.dcm"))], SkipPolicy(allow_secondary_capture=True)
    )
    assert not refs and skips[0].reason == "unsupported_modality"


def test_missing_pixels_truncated_and_garbage(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "np", np.zeros((3, 4, 4)), AXIAL, (0, 0, 0), (1, 1))
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.PixelData
        ds.save_as(p)
    out = _load_one(paths)
    assert isinstance(out, Skip) and out.reason == "missing_pixel_data"
    out = _load_one([Path(get_testdata_file("MR_truncated.dcm"))])
    assert isinstance(out, Skip) and out.reason == "unreadable"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(3000))
    assert list(find_dicom_files(garbage)) == [garbage]
    refs, skips = scan_series([garbage])
    outcomes = skips + [load_series(r) for r in refs]
    assert len(outcomes) == 1 and isinstance(outcomes[0], Skip)


def test_find_dicom_files_by_content(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "IM0001")  # no extension
    (tmp_path / "notes.dcm").write_text("not dicom at all, despite the name")
    (tmp_path / "sub").mkdir()
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw.file_meta, raw.preamble = FileMetaDataset(), None  # bare data set: no preamble/meta
    raw.save_as(tmp_path / "sub" / "raw.bin", implicit_vr=True, little_endian=True)  # no preamble
    assert (tmp_path / "sub" / "raw.bin").read_bytes()[128:132] != b"DICM"
    (tmp_path / "scan.json").write_text("{}")  # a NIfTI sidecar: not ours to count
    not_dicom: list[Skip] = []
    found = [p.relative_to(tmp_path).as_posix() for p in find_dicom_files(tmp_path, not_dicom)]
    assert found == ["IM0001", "sub/raw.bin"]
    assert [(s.path.name, s.reason) for s in not_dicom] == [("notes.dcm", "not_dicom")]
    refs, skips = scan_series(find_dicom_files(tmp_path))
    assert len(refs) == 1 and [s.reason for s in skips] == ["duplicate_instance"]
    # the bare data set (encoding found by the parser) decodes like the original file
    raw_volume = _load_one([tmp_path / "sub" / "raw.bin"])
    assert isinstance(raw_volume, Volume)
    np.testing.assert_array_equal(raw_volume.array, load_series(refs[0]).array)


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_with_and_without_sidecar(tmp_path: Path) -> None:
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    nib.save(
        nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), affine),
        tmp_path / "a.nii.gz",
    )
    (tmp_path / "a.json").write_text(
        json.dumps({"Modality": "MR", "PatientID": "P9", "EchoTime": 0.03})
    )
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine), tmp_path / "b.nii")
    nib.save(nib.Nifti1Image(np.zeros((3, 4), np.float32), affine), tmp_path / "c.nii")
    (tmp_path / "c.json").write_text(json.dumps({"Modality": "CT"}))
    assert [p.name for p in find_nifti_files(tmp_path)] == ["a.nii.gz", "b.nii", "c.nii"]
    v = load_nifti(tmp_path / "a.nii.gz")
    assert isinstance(v, Volume) and v.source_format == "nifti" and v.modality == "MR"
    assert v.header.PatientID == "P9" and v.spacing == pytest.approx((1.5, 1.5, 3.0))
    np.testing.assert_allclose(v.affine, affine)
    out, meta = preprocess(v, PreprocessConfig(mr_spacing=(1.5, 1.5, 3.0)))
    assert meta["orientation"] == "RAS" and out.shape == (3, 4, 5)
    # values grow with the stored x index, which points Left: in RAS they fall along x
    assert (np.diff(out[:, 1, 1].astype(np.float32)) < 0).all()
    assert (np.diff(out[1, :, 1].astype(np.float32)) > 0).all()  # y already pointed Anterior
    for name, reason in (("b.nii", "nifti_without_sidecar"), ("c.nii", "unsupported_dims")):
        skip = load_nifti(tmp_path / name)
        assert isinstance(skip, Skip) and skip.reason == reason


# ----------------------------------------------------------------------------- the real test
def test_every_pydicom_testdata_file_is_ingested_or_skipped(tmp_path: Path) -> None:
    """All of pydicom's test files through find -> scan -> load -> preprocess; none raises."""
    start = time.perf_counter()
    sources = [Path(f) for f in get_testdata_files() if os.path.isfile(f)]
    assert len(sources) > 200
    for i, src in enumerate(sources):  # flat, unique names; symlinks keep it cheap
        (tmp_path / f"{i:03d}_{src.name}").symlink_to(src)
    outcome: dict[Path, str] = {p: "not_dicom" for p in tmp_path.iterdir()}
    with warnings.catch_warnings(record=True) as caught:  # pydicom warnings quote values
        warnings.simplefilter("always")
        found = list(find_dicom_files(tmp_path))
        refs, skips = scan_series(found)
        results = [load_series(ref) for ref in refs]
    assert not [w for w in caught if "pydicom" in w.filename]
    for skip in skips:
        outcome[skip.path] = f"skip: {skip.reason}"
    config = PreprocessConfig(
        ct_spacing=(3.0, 3.0, 3.0), mr_spacing=(3.0, 3.0, 3.0), longest_side_2d=128
    )
    for ref, result in zip(refs, results, strict=True):
        if isinstance(result, Skip):
            skips.append(result)
            label = f"skip: {result.reason}"
        else:
            array, meta = preprocess(result, config)
            assert array.shape == tuple(meta["shape"]) and meta["dims"] == array.ndim
            assert array.dtype == (np.int16 if meta["modality"] == "CT" else np.float16)
            label = f"ingested: {meta['modality']} {meta['dims']}D"
        for path in ref.files:
            outcome[path] = label
    # no skip detail repeats an identifying header value
    for skip in skips:
        try:
            with quiet_reading():
                ds = pydicom.dcmread(skip.path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in IDENTIFYING:
            value = str(ds.get(keyword, "") or "")
            assert len(value) < 4 or value not in skip.detail, f"{skip.path.name}: {keyword}"
    counts = Counter(outcome.values())
    print(f"\npydicom test files: {len(outcome)} in {time.perf_counter() - start:.1f} s")
    for label, n in sorted(counts.items()):
        print(f"  {label:<40} {n:>4}")
    assert sum(counts.values()) == len(sources)
    assert sum(n for k, n in counts.items() if k.startswith("ingested: CT 3D")) >= 1
    assert sum(n for k, n in counts.items() if k.startswith("ingested: XR")) >= 3
    assert {"skip: non_image_sop", "skip: secondary_capture", "skip: localizer"} <= set(counts)


def test_series_ref_fields_are_memory_only() -> None:
    ref = SeriesRef([Path("x")], "1.2.3.4", "1.2.3.5", "CT", "slices", 4, 4, split_tag="1.2.3.6")
    assert "1.2.3" not in repr(ref)
