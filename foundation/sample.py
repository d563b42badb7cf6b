"""The unit that travels from ingest to the shards: one pseudonymised, preprocessed series.

Contract (DESIGN.md, "Sample in a shard"):
- ``key``: ``<study-pseudonym>_<series-index>``; no dot (webdataset cuts keys at the first dot)
  and never an original UID.
- ``image``: 2D images are ``(H, W)`` in display order (rows, columns); 3D volumes are
  ``(X, Y, Z)`` in the canonical orientation recorded in ``meta["orientation"]`` (RAS).
  CT is int16 Hounsfield units; MR and X-ray are float16 in [0, 1].
- ``meta``: allow-listed fields only (see ``META_FIELDS``), JSON-serialisable.
- ``report``: the scrubbed report text of the study ("" when there is none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Every key a sample's meta.json may hold. Anything else is a contract violation.
META_FIELDS: frozenset[str] = frozenset(
    {
        "patient",  # patient pseudonym
        "study",  # study pseudonym
        "accession",  # accession-number pseudonym (joins label tables keyed by accession)
        "series_index",  # int, order of the series within the study
        "site",  # site pseudonym (several centres)
        "key_id",  # fingerprint of the pseudonymisation key (never the key)
        "modality",  # "CT" | "MR" | "XR" (CR and DX are both XR)
        "source_modality",  # DICOM Modality as read: CT, MR, CR, DX, ...
        "dims",  # 2 or 3
        "body_part",
        "spacing",  # mm per image axis, same order as the array
        "shape",
        "orientation",  # "RAS" for 3D, None for 2D
        "study_date",  # shifted, ISO "YYYY-MM-DD"
        "age_years",  # whole years, capped at 90
        "sex",  # "M" | "F" | "O" | None
        "acquisition",  # allow-listed acquisition parameters (dict)
        "preprocessing",  # {"version": ..., "policy": {...}}
        "source_format",  # "dicom" | "nifti"
    }
)

MODALITIES: tuple[str, ...] = ("CT", "MR", "XR")
_KEY_RE = re.compile(r"^[0-9a-z]+_[0-9]+$")


def sample_key(study_pseudonym: str, series_index: int) -> str:
    """The shard key of a series: ``<study-pseudonym>_<series-index>``."""
    key = f"{study_pseudonym}_{series_index}"
    if not _KEY_RE.match(key):
        raise ValueError("sample key must be lowercase alphanumerics, '_' and a series index")
    return key


@dataclass
class Sample:
    """One series, ready to be written to a shard."""

    key: str
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    report: str = ""

    def validate(self) -> None:
        """Raise ``ValueError`` if the sample breaks the shard contract."""
        if not _KEY_RE.match(self.key):
            raise ValueError(f"invalid sample key {self.key!r}")
        extra = set(self.meta) - META_FIELDS
        if extra:
            raise ValueError(f"meta fields outside the allow-list: {sorted(extra)}")
        for required in ("patient", "study", "modality", "dims", "spacing", "shape"):
            if required not in self.meta:
                raise ValueError(f"sample {self.key}: meta lacks {required!r}")
        if self.image.ndim != self.meta["dims"]:
            raise ValueError(
                f"sample {self.key}: image has {self.image.ndim} dims, meta says {self.meta['dims']}"
            )
        if list(self.image.shape) != list(self.meta["shape"]):
            raise ValueError(f"sample {self.key}: image shape differs from meta['shape']")
        if self.meta["modality"] not in MODALITIES:
            raise ValueError(f"sample {self.key}: unknown modality {self.meta['modality']!r}")
