"""NIfTI series with a JSON sidecar of DICOM-keyword identifiers (as dcm2niix-style exports).

The gzip stream is written with ``mtime=0`` so the same cohort gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from foundation.synthetic.geometry import SliceStack

SIDECAR_KEYS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyDate",
    "Modality",
    "BodyPartExamined",
    "InstitutionName",
)


def write_nifti(
    stem: Path,
    planes: np.ndarray,
    stack: SliceStack,
    sidecar: dict[str, Any],
    scl_inter: float = 0.0,
) -> tuple[Path, Path]:
    """Write ``<stem>.nii.gz`` and ``<stem>.json``; ``planes`` is (K, rows, cols).

    The NIfTI array is ``(cols, rows, K)`` so that the affine of ``stack.ras_affine()`` maps
    voxel (i, j, k) to the same point as DICOM pixel (row j, column i) of plane k. With
    ``scl_inter`` the stored values are ``planes - scl_inter`` and readers add it back.
    """
    missing = [k for k in SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise ValueError(f"{stem}: sidecar lacks {missing}")
    data = np.ascontiguousarray(planes.transpose(2, 1, 0))
    if scl_inter:
        data = (data.astype(np.int32) - int(scl_inter)).astype(np.uint16)
    affine = stack.ras_affine()
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if scl_inter:
        img.header.set_slope_inter(1.0, float(scl_inter))
    stem.parent.mkdir(parents=True, exist_ok=True)
    nii = stem.with_name(stem.name + ".nii.gz")
    nii.write_bytes(gzip.compress(img.to_bytes(), mtime=0))
    js = stem.with_name(stem.name + ".json")
    js.write_text(json.dumps(sidecar, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return nii, js
