"""What ingest leaves out, and why: the skip policy and its stable reason codes.

A long ingest never stops on one bad file. Every file or series that is not turned into a
sample becomes a ``Skip`` with a short stable ``reason`` code (counted in the ingest report)
and a ``detail`` written by us. Details never hold header values: no UIDs, names, dates or
free text from the file, only our own words, attribute *keywords* and exception class names.

The header checks here run on a header-only read (``stop_before_pixels=True``); checks that
need the pixels (missing pixel data, decode failures, geometry) live in ``dicom.py``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from foundation.ingest.volume import XRAY_MODALITIES, Skip

# Stable reason codes (the ingest report counts these; add, never rename).
NON_IMAGE_SOP = "non_image_sop"  # SR, RT plan/struct/dose, SEG, PR, KO, waveforms, DICOMDIR...
LOCALIZER = "localizer"  # ImageType holds LOCALIZER or SCOUT
BURNED_IN_ANNOTATION = "burned_in_annotation"  # BurnedInAnnotation == YES
SECONDARY_CAPTURE = "secondary_capture"  # screenshots, scanned film, derived renderings
FOR_PROCESSING = "for_processing"  # raw detector images (DX/MG "For Processing")
UNSUPPORTED_MODALITY = "unsupported_modality"  # PT, NM, US, OT, RTIMAGE, ...
COLOUR_IMAGE = "colour_image"  # RGB / YBR / PALETTE COLOR
MULTIFRAME_CINE = "multiframe_cine"  # multi-frame without per-frame geometry (cine, US, XA runs)
MISSING_UID = "missing_uid"  # no StudyInstanceUID / SeriesInstanceUID: cannot group or pseudonymise
MISSING_PIXEL_DATA = "missing_pixel_data"
MISSING_GEOMETRY = "missing_geometry"  # a 3D series without orientation/position/spacing
INCONSISTENT_GEOMETRY = "inconsistent_geometry"  # gaps, duplicates, mixed sizes or orientations
TOO_FEW_SLICES = "too_few_slices"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # no decoder plugin installed
UNSUPPORTED_DIMS = "unsupported_dims"  # NIfTI that is not 3D, ...
UNREADABLE = "unreadable"  # not parseable, truncated, pixel decode failed
NIFTI_WITHOUT_SIDECAR = "nifti_without_sidecar"
NOT_DICOM = "not_dicom"
DUPLICATE_INSTANCE = "duplicate_instance"  # same SOPInstanceUID as a file already scanned
EXCLUDED = "excluded"  # patient in the exclusion list (opposition/erasure): never read further

__all__ = [
    "DEFAULT_POLICY",
    "Skip",
    "SkipPolicy",
    "error_detail",
    "header_skip",
    "quiet_reading",
]

PHOTOMETRIC_GREY = ("MONOCHROME1", "MONOCHROME2")


def error_detail(stage: str, exc: BaseException) -> str:
    """A detail for an exception: the stage and the exception class, never its message.

    Messages of parser errors may quote header values, so they are dropped on purpose.
    """
    return f"{type(exc).__name__} while {stage}"


@contextmanager
def quiet_reading() -> Iterator[None]:
    """Silence pydicom's warnings and log lines while reading one file.

    They quote header values ("Invalid value for VR ...: '<value>'"), which must not reach
    the ingest logs; what went wrong is reported by the ``Skip`` instead.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class SkipPolicy:
    """Which series ingest keeps. Typed, built from a YAML-able dict with ``from_dict``."""

    volume_modalities: tuple[str, ...] = ("CT", "MR")  # read as 3D series
    xray_modalities: tuple[str, ...] = ("CR", "DX", "MG", "XA", "RF")  # single-frame 2D -> "XR"
    allow_secondary_capture: bool = False
    allow_for_processing: bool = False
    skip_localizers: bool = True
    skip_burned_in_annotation: bool = True
    # A CT/MR series of one single-frame slice: "2d" keeps it as a 2D image of its modality
    # (dims=2, e.g. a key image), "skip" drops it. Series of 2 .. min_slices-1 slices are
    # always skipped: too thin to resample as a volume, and not a clean 2D image either.
    single_slice: str = "2d"
    min_slices: int = 3
    # Relative tolerance on slice spacing before a series counts as having gaps.
    spacing_tolerance: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SkipPolicy:
        d = dict(d or {})
        for name in ("volume_modalities", "xray_modalities"):
            if name in d:
                d[name] = tuple(d[name])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown skip policy fields: {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self) -> None:
        if self.single_slice not in ("2d", "skip"):
            raise ValueError("skip policy single_slice must be '2d' or 'skip'")
        if not set(self.volume_modalities) <= {"CT", "MR"}:
            raise ValueError("skip policy volume_modalities must be among CT, MR")
        if not set(self.xray_modalities) <= XRAY_MODALITIES:
            raise ValueError(f"skip policy xray_modalities must be among {sorted(XRAY_MODALITIES)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


DEFAULT_POLICY = SkipPolicy()


def sop_class_name(ds: pydicom.Dataset) -> str:
    """The dictionary name of the SOP class ("" when absent or private); never the raw UID."""
    uid = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    if not uid:
        return ""
    name = UID(str(uid)).name
    return "" if name == str(uid) else name  # unknown UIDs name themselves


def _image_type(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).upper() for v in values]


def header_skip(
    ds: pydicom.Dataset, path: Path, policy: SkipPolicy = DEFAULT_POLICY
) -> Skip | None:
    """Apply the header-level skip policy to one file's header; ``None`` means keep it.

    Order matters only for which reason a file is counted under; it is fixed and documented
    by the sequence of checks below.
    """
    name = sop_class_name(ds)
    has_image_attrs = "Rows" in ds and "Columns" in ds
    if name and "Image Storage" not in name:
        return Skip(NON_IMAGE_SOP, path, f"SOP class {name}")
    if not name and not has_image_attrs:
        return Skip(NON_IMAGE_SOP, path, "no image SOP class and no Rows/Columns")
    # Burned-in text is a privacy reason: counted as such even on a secondary capture.
    if (
        policy.skip_burned_in_annotation
        and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    ):
        return Skip(BURNED_IN_ANNOTATION, path, "BurnedInAnnotation is YES")
    if "Secondary Capture" in name and not policy.allow_secondary_capture:
        return Skip(SECONDARY_CAPTURE, path, f"SOP class {name}")
    if "For Processing" in name and not policy.allow_for_processing:
        return Skip(FOR_PROCESSING, path, f"SOP class {name}")
    image_type = _image_type(ds)
    if policy.skip_localizers and ("LOCALIZER" in image_type or "SCOUT" in image_type):
        return Skip(LOCALIZER, path, "ImageType marks a localizer")
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in policy.volume_modalities and modality not in policy.xray_modalities:
        # The modality code is a small closed vocabulary, safe to name when it is one.
        shown = modality if modality.isalpha() and len(modality) <= 8 else "unknown"
        return Skip(UNSUPPORTED_MODALITY, path, f"modality {shown or 'missing'}")
    if not has_image_attrs:
        return Skip(MISSING_PIXEL_DATA, path, "no Rows/Columns")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in PHOTOMETRIC_GREY or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return Skip(COLOUR_IMAGE, path, "not a MONOCHROME1/2 single-sample image")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        enhanced = "PerFrameFunctionalGroupsSequence" in ds
        if modality not in policy.volume_modalities or not enhanced:
            return Skip(MULTIFRAME_CINE, path, "multi-frame image without per-frame geometry")
    if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
        return Skip(MISSING_UID, path, "StudyInstanceUID or SeriesInstanceUID missing")
    return None
