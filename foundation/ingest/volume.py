"""What reading gives: a ``Volume`` (pixels, geometry, identifying header) or a ``Skip``.

A ``Volume`` holds original identifiers (``header``) and must stay in memory: the privacy code
reads what it needs from it and only allow-listed, pseudonymised fields reach the shards. The
identifying fields are left out of ``repr`` so an accidental log line cannot leak them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

# DICOM modalities read as 2D projection radiographs; all map to "XR" in the sample meta.
XRAY_MODALITIES: frozenset[str] = frozenset({"CR", "DX", "MG", "XA", "RF", "DR", "PX", "IO"})


@dataclass
class Skip:
    """One file or series that ingest leaves out (reason codes: ``ingest/skip.py``).

    ``reason`` is a short stable code; ``detail`` is our own words and never holds header values.
    """

    reason: str
    path: Path
    detail: str = ""

    def __str__(self) -> str:
        return f"skip {self.path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Volume:
    """One series as read, in its source orientation.

    ``array`` is 3D ``(X, Y, Z)`` with ``affine`` mapping voxel indices to RAS+ mm (nibabel
    convention), or 2D ``(rows, cols)`` in display order with ``affine=None``. Intensities are
    modality values (CT in HU after the rescale), float32.
    """

    array: np.ndarray = field(repr=False)
    affine: np.ndarray | None
    spacing: tuple[float, ...]  # mm per array axis, same order as the array
    modality: str  # source modality as read: CT, MR, CR, DX, ...
    header: pydicom.Dataset = field(repr=False)  # identifying; memory only, never logged
    source_format: str  # "dicom" | "nifti"
    source: Path  # one file of the series, for error messages

    @property
    def dims(self) -> int:
        return self.array.ndim

    @property
    def canonical_modality(self) -> str:
        """The sample modality: "CT", "MR" or "XR" (every projection radiograph)."""
        return "XR" if self.modality in XRAY_MODALITIES else self.modality

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise ValueError(f"{self.source}: volume array must be 2D or 3D")
        if len(self.spacing) != self.array.ndim:
            raise ValueError(f"{self.source}: spacing must give one value per array axis")
        if (self.affine is None) != (self.array.ndim == 2):
            raise ValueError(f"{self.source}: 3D volumes need an affine, 2D images none")
