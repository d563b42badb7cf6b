"""A DICOM series -> a ``Volume`` with geometry (3D affine in RAS+) or a 2D radiograph.

Geometry (PS3.3 C.7.6.2.1.1): ``ImageOrientationPatient`` holds the row direction cosine (the
direction of increasing column index) then the column direction cosine; ``PixelSpacing`` is
(row spacing, column spacing). Slices are sorted along the slice normal ``row x col`` by the
projection of ``ImagePositionPatient``; the slice step comes from the positions (never from
``SliceThickness``), so gaps, overlaps and duplicates are seen and the series skipped. The
array is ``(X=column index, Y=row index, Z=slice)`` as nibabel reads DICOM, and the LPS affine
is turned to RAS+ by flipping its first two rows.

Pixels are decoded by pydicom (compressed syntaxes through the pylibjpeg plugins), then the
modality LUT / rescale is applied (CT -> HU) and MONOCHROME1 radiographs are inverted.
``load_series`` never raises for bad data: every failure becomes a ``Skip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from foundation.ingest.discover import SeriesRef
from foundation.ingest.skip import (
    DEFAULT_POLICY,
    INCONSISTENT_GEOMETRY,
    MISSING_GEOMETRY,
    MISSING_PIXEL_DATA,
    TOO_FEW_SLICES,
    UNREADABLE,
    UNSUPPORTED_TRANSFER_SYNTAX,
    Skip,
    SkipPolicy,
    error_detail,
    quiet_reading,
)
from foundation.ingest.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class SkipSeries(Exception):
    """Raised inside the reader to leave a series with a ``Skip``; caught by ``load_series``."""

    def __init__(self, reason: str, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.skip = Skip(reason, path, detail)


@dataclass
class _Plane:
    """One 2D frame with its geometry (LPS mm)."""

    pixels: np.ndarray  # (rows, cols) float32, after the modality LUT
    position: np.ndarray | None  # (3,) ImagePositionPatient
    orientation: np.ndarray | None  # (6,) ImageOrientationPatient
    spacing: tuple[float, float] | None  # (row spacing, column spacing)


def load_series(ref: SeriesRef, policy: SkipPolicy = DEFAULT_POLICY) -> Volume | Skip:
    """Read one series found by ``scan_series``; returns a ``Skip`` instead of raising."""
    try:
        with quiet_reading():  # pydicom warnings may quote header values
            if ref.kind == "image":
                return _load_radiograph(ref)
            if ref.kind == "enhanced":
                return _load_enhanced(ref, policy)
            return _load_slices(ref, policy)
    except SkipSeries as skip:
        return skip.skip
    except Exception as exc:  # a long ingest never stops on one bad file
        return Skip(UNREADABLE, ref.source, error_detail("loading the series", exc))


def read_dataset(path: Path) -> pydicom.Dataset:
    """Full read of one file, with a transfer syntax set when the file meta lacks one."""
    try:
        with quiet_reading():
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise SkipSeries(UNREADABLE, path, error_detail("reading the file", exc)) from exc
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise SkipSeries(MISSING_PIXEL_DATA, path, "no PixelData element")
    if "TransferSyntaxUID" not in ds.file_meta:
        # Raw data sets (no file meta) are native-encoded: take the encoding the parser found.
        implicit, little = ds.original_encoding
        ts = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def decode_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Decoded stored values: ``(rows, cols)`` or ``(frames, rows, cols)``; skips if it cannot."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    shown = ts.name if ts.is_transfer_syntax else "unknown transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise SkipSeries(UNSUPPORTED_TRANSFER_SYNTAX, path, f"no decoder for {shown}") from exc
    if not decoder.is_available:
        raise SkipSeries(UNSUPPORTED_TRANSFER_SYNTAX, path, f"no plugin installed for {shown}")
    try:
        with quiet_reading():
            return ds.pixel_array
    except Exception as exc:
        raise SkipSeries(UNREADABLE, path, error_detail(f"decoding {shown}", exc)) from exc


def _floats(value: object, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        s = _floats(ds.get(keyword), 2)
        if s is not None and np.all(s > 0):
            return float(s[0]), float(s[1])
    return None


def _header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset without its pixels: the identifying header the privacy code reads."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _rescaled(frame: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)


def _load_radiograph(ref: SeriesRef) -> Volume:
    """One 2D projection image: modality LUT, MONOCHROME1 inverted, spacing from the header."""
    path = ref.source
    ds = read_dataset(path)
    arr = decode_pixels(ds, path)
    if arr.ndim != 2:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "radiograph pixels are not 2D")
    return _image_2d(_rescaled(arr, ds), ds, path, ref.modality)


def _image_2d(
    arr: np.ndarray,
    ds: pydicom.Dataset,
    path: Path,
    modality: str,
    spacing: tuple[float, float] | None = None,
) -> Volume:
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr  # MONOCHROME1: low values display white
    # No spacing at all (some CR): 1 mm per pixel, so the image still trains; spacing is
    # recorded in meta and consumers that need true mm can filter on the header.
    spacing = spacing or _spacing(ds) or (1.0, 1.0)
    return Volume(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        affine=None,
        spacing=spacing,
        modality=modality,
        header=_header_only(ds),
        source_format="dicom",
        source=path,
    )


def _load_slices(ref: SeriesRef, policy: SkipPolicy) -> Volume:
    """Single-frame CT/MR files of one series -> one 3D volume (or a 2D image for one slice)."""
    n = len(ref.files)
    if n == 1 and policy.single_slice == "2d":
        ds = read_dataset(ref.source)
        arr = decode_pixels(ds, ref.source)
        if arr.ndim != 2:
            raise SkipSeries(INCONSISTENT_GEOMETRY, ref.source, "single slice is not 2D")
        plane = _plane(ds, arr, 0)
        return _image_2d(plane.pixels, ds, ref.source, ref.modality, plane.spacing)
    if n < policy.min_slices:
        raise SkipSeries(TOO_FEW_SLICES, ref.source, f"{n} slice(s), need {policy.min_slices}")
    planes: list[_Plane] = []
    headers: list[pydicom.Dataset] = []
    for path in ref.files:
        ds = read_dataset(path)
        arr = decode_pixels(ds, path)
        if arr.ndim != 2:
            raise SkipSeries(INCONSISTENT_GEOMETRY, path, "slice pixels are not 2D")
        planes.append(_plane(ds, arr, 0))
        headers.append(_header_only(ds))  # drop pixels now: only one header is kept
    array, affine, spacing, first = stack_planes(planes, ref.source, policy)
    return Volume(array, affine, spacing, ref.modality, headers[first], "dicom", ref.source)


def _group_item(ds: pydicom.Dataset, index: int, sequence: str) -> pydicom.Dataset | None:
    """Item of a functional group for one frame: the per-frame one, else the shared one."""
    for groups, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i and sequence in seq[i] and len(seq[i][sequence].value):
            return seq[i][sequence].value[0]
    return None


def _plane(ds: pydicom.Dataset, frame: np.ndarray, index: int) -> _Plane:
    """Frame ``index`` of ``ds`` with its geometry and rescale: top-level attributes of a
    single-frame image, else the enhanced functional groups (per-frame, then shared)."""
    position = _group_item(ds, index, "PlanePositionSequence") or ds
    orientation = _group_item(ds, index, "PlaneOrientationSequence") or ds
    measures = _group_item(ds, index, "PixelMeasuresSequence") or ds
    transform = _group_item(ds, index, "PixelValueTransformationSequence") or ds
    return _Plane(
        pixels=_rescaled(frame, transform),
        position=_floats(position.get("ImagePositionPatient"), 3),
        orientation=_floats(orientation.get("ImageOrientationPatient"), 6),
        spacing=_spacing(measures),
    )


def _load_enhanced(ref: SeriesRef, policy: SkipPolicy) -> Volume:
    """One enhanced multi-frame CT/MR file: per-frame geometry from the functional groups."""
    path = ref.source
    ds = read_dataset(path)
    frames = decode_pixels(ds, path)
    if frames.ndim != 3:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "multi-frame pixels are not 3D")
    if frames.shape[0] < policy.min_slices:
        raise SkipSeries(
            TOO_FEW_SLICES, path, f"{frames.shape[0]} frame(s), need {policy.min_slices}"
        )
    planes = [_plane(ds, frame, i) for i, frame in enumerate(frames)]
    array, affine, spacing, _ = stack_planes(planes, path, policy)
    return Volume(array, affine, spacing, ref.modality, _header_only(ds), "dicom", path)


def stack_planes(
    planes: list[_Plane], path: Path, policy: SkipPolicy = DEFAULT_POLICY
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], int]:
    """Sort planes along the slice normal and build ``(X, Y, Z)`` array + RAS affine.

    Returns the array, the 4x4 affine (voxel -> RAS+ mm), the spacing per array axis and the
    index (in input order) of the first plane after sorting. Raises ``SkipSeries`` on missing
    or inconsistent geometry.
    """
    if any(p.position is None or p.orientation is None or p.spacing is None for p in planes):
        raise SkipSeries(MISSING_GEOMETRY, path, "a slice lacks position, orientation or spacing")
    iops = np.stack([p.orientation for p in planes])  # (N, 6)
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "slices have different orientations")
    pixel_spacings = np.asarray([p.spacing for p in planes])  # (N, 2)
    if np.abs(pixel_spacings - pixel_spacings[0]).max() > 1e-3:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "slices have different pixel spacings")
    if len({p.pixels.shape for p in planes}) != 1:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "slices have different sizes")
    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "orientation cosines are not orthonormal")
    positions = np.stack([p.position for p in planes])  # (N, 3) LPS mm
    along = positions @ normal  # (N,) distance along the normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    step = float(np.median(steps))
    if step < 1e-3 or steps.min() < 1e-3:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "duplicate slice positions")
    if np.abs(steps - step).max() > policy.spacing_tolerance * step + 1e-3:
        raise SkipSeries(INCONSISTENT_GEOMETRY, path, "uneven slice spacing (gap or overlap)")
    first, last = positions[order[0]], positions[order[-1]]
    # The step vector from positions keeps a gantry tilt as a shear instead of losing it.
    slice_vec = (last - first) / (len(planes) - 1)
    row_spacing, col_spacing = pixel_spacings[0]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing  # +X: along a row, i.e. increasing column index
    affine_lps[:3, 1] = col_cos * row_spacing  # +Y: down a column, i.e. increasing row index
    affine_lps[:3, 2] = slice_vec
    affine_lps[:3, 3] = first
    # (N, rows, cols) sorted -> (cols, rows, N) = (X, Y, Z)
    array = np.stack([planes[i].pixels for i in order]).transpose(2, 1, 0)
    spacing = (float(col_spacing), float(row_spacing), float(np.linalg.norm(slice_vec)))
    return np.ascontiguousarray(array), LPS_TO_RAS @ affine_lps, spacing, int(order[0])
