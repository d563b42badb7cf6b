"""NIfTI volumes with their JSON sidecar (BIDS / dcm2niix style).

A NIfTI file holds no identifiers we can trust or pseudonymise, so the sidecar (same stem,
``.json``) is required: its DICOM-keyword fields (``PatientID``, ``StudyInstanceUID``,
``Modality``, ...) become the ``header`` Dataset the privacy code reads. A NIfTI without a
sidecar is skipped. The affine is passed through as nibabel gives it (voxel -> RAS+ mm);
``preprocess`` reorients to RAS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword

from foundation.ingest.skip import (
    NIFTI_WITHOUT_SIDECAR,
    UNREADABLE,
    UNSUPPORTED_DIMS,
    UNSUPPORTED_MODALITY,
    Skip,
    error_detail,
)
from foundation.ingest.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_MODALITIES = ("CT", "MR")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sidecar_path(path: Path) -> Path:
    """``scan.nii.gz`` -> ``scan.json`` in the same folder."""
    return path.with_name(_stem(path) + ".json")


def find_nifti_files(root: Path) -> Iterator[Path]:
    """Yield ``*.nii`` and ``*.nii.gz`` files under ``root`` (recursively, sorted)."""
    root = Path(root)
    if root.is_file():
        if root.name.lower().endswith(NIFTI_SUFFIXES):
            yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(NIFTI_SUFFIXES):
                yield Path(dirpath) / name


def sidecar_dataset(sidecar: dict) -> pydicom.Dataset:
    """Sidecar fields named by DICOM keyword -> a Dataset; other keys (BIDS names) are dropped."""
    ds = pydicom.Dataset()
    for keyword, value in sidecar.items():
        tag = tag_for_keyword(keyword)
        if tag is None or isinstance(value, dict):
            continue
        if dictionary_VR(tag) == "SQ":
            continue
        try:
            setattr(ds, keyword, value)
        except (TypeError, ValueError, OverflowError):
            continue  # a value the VR cannot hold is left out, never guessed
    return ds


def load_nifti(path: Path) -> Volume | Skip:
    """One NIfTI + sidecar -> a 3D ``Volume``; returns a ``Skip`` instead of raising."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return Skip(NIFTI_WITHOUT_SIDECAR, path, "no JSON sidecar with the same stem")
    try:
        with open(sidecar, encoding="utf-8") as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            return Skip(UNREADABLE, path, "sidecar JSON is not an object")
        header = sidecar_dataset(fields)
    except Exception as exc:
        return Skip(UNREADABLE, path, error_detail("reading the sidecar", exc))
    modality = str(fields.get("Modality", "")).strip().upper()
    if modality not in VOLUME_MODALITIES:
        shown = modality if modality.isalpha() and len(modality) <= 8 else "unknown"
        return Skip(UNSUPPORTED_MODALITY, path, f"sidecar modality {shown or 'missing'}")
    try:
        img = nib.load(path)
        array = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        return Skip(UNREADABLE, path, error_detail("reading the NIfTI", exc))
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        return Skip(UNSUPPORTED_DIMS, path, f"{array.ndim}D image; only 3D volumes are read")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        return Skip(UNREADABLE, path, "singular or non-finite affine")
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(array, affine, spacing, modality, header, "nifti", path)
