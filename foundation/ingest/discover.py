"""Find DICOM files by content and group them into series from a header-only scan.

PACS exports name files anything (``IM000001``, ``1.2.3.dcm``, no extension at all), so files
are recognised by content: the ``DICM`` marker after the 128-byte preamble, or a data set that
starts without a preamble (first tag in group 0002 or 0008) and parses. Grouping reads headers
only (``stop_before_pixels=True``): study UID, series UID, then image size, orientation and echo
number, so one ``SeriesRef`` always holds slices that can stack into one volume.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from foundation.ingest.skip import (
    DEFAULT_POLICY,
    DUPLICATE_INSTANCE,
    NOT_DICOM,
    UNREADABLE,
    Skip,
    SkipPolicy,
    error_detail,
    header_skip,
    quiet_reading,
)

_PREAMBLE = 128
_MAGIC = b"DICM"
# Groups a raw data set (no preamble, no file meta) plausibly starts with.
_FIRST_GROUPS = {0x0002, 0x0008}
_NOT_OURS = (".nii", ".nii.gz", ".json")  # read by nifti.py, not counted as not_dicom


@dataclass
class SeriesRef:
    """One series found by the header scan: its files and light header information.

    Memory only: ``study_uid`` and ``series_uid`` are original UIDs, left out of ``repr``.
    ``kind`` says how ``load_series`` reads it: "slices" (single-frame CT/MR stacked along the
    slice normal), "enhanced" (one multi-frame CT/MR file) or "image" (one 2D radiograph).
    """

    files: list[Path]
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str
    kind: str
    rows: int
    columns: int
    number_of_frames: int = 1
    orientation: tuple[float, ...] | None = field(default=None, repr=False)  # IOP, rounded
    # Tells apart the parts of one SeriesInstanceUID (geometry groups, one radiograph or
    # multi-frame file each): stable across re-exports, memory only (may hold a UID).
    split_tag: str = field(default="", repr=False)

    @property
    def source(self) -> Path:
        return self.files[0]


def looks_like_dicom(path: Path) -> bool:
    """True if ``path`` holds DICOM: the ``DICM`` marker at 128, or a parseable raw data set."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE + 4)
    except OSError:
        return False
    if len(head) == _PREAMBLE + 4 and head[_PREAMBLE:] == _MAGIC:
        return True
    if len(head) < 8:
        return False
    group_le, group_be = struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]
    if group_le not in _FIRST_GROUPS and group_be not in _FIRST_GROUPS:
        return False
    try:
        with quiet_reading():
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return False
    return len(ds) > 0


def find_dicom_files(root: Path, skipped: list[Skip] | None = None) -> Iterator[Path]:
    """Yield every DICOM file under ``root`` (recursively, sorted), recognised by content.

    With ``skipped``, every other file is appended to it as a ``not_dicom`` skip, except the
    NIfTI files and JSON sidecars that ``nifti.py`` reads.
    """
    root = Path(root)
    paths = [root] if root.is_file() else _walk(root)
    for path in paths:
        if looks_like_dicom(path):
            yield path
        elif skipped is not None and not path.name.lower().endswith(_NOT_OURS):
            skipped.append(Skip(NOT_DICOM, path, "no DICM marker and no parseable data set"))


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def read_header(path: Path) -> pydicom.Dataset:
    """Header-only read; ``force`` because raw data sets without a preamble are valid input."""
    with quiet_reading():
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _rounded_iop(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    try:
        iop = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    except (TypeError, ValueError):
        return None  # unusable orientation: load_series reports the missing geometry
    # Rounded so that float noise between slices of one stack does not split it.
    return tuple(round(v, 3) + 0.0 for v in iop) if len(iop) == 6 else None


def _scan_one(path: Path, policy: SkipPolicy, seen: set[str]) -> SeriesRef | Skip:
    """Header of one file -> a one-file ``SeriesRef`` (grouped by the caller) or a ``Skip``."""
    try:
        ds = read_header(path)
    except Exception as exc:
        return Skip(UNREADABLE, path, error_detail("reading the header", exc))
    if len(ds) == 0:
        return Skip(NOT_DICOM, path, "no data elements")
    try:
        skip = header_skip(ds, path, policy)
        if skip is not None:
            return skip
        instance = str(ds.get("SOPInstanceUID", "")).strip()
        if instance and instance in seen:
            return Skip(DUPLICATE_INSTANCE, path, "SOPInstanceUID seen in another file")
        seen.add(instance)
        modality = str(ds.Modality).strip().upper()
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if modality in policy.volume_modalities:
            kind = "enhanced" if n_frames > 1 else "slices"
        else:
            kind = "image"
        ref = SeriesRef(
            files=[path],
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            modality=modality,
            kind=kind,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            number_of_frames=n_frames,
            orientation=_rounded_iop(ds),
        )
        if kind == "slices":  # the grouping key within a series: one stackable geometry
            echo = str(ds.get("EchoNumbers", ""))
            ref.split_tag = f"{ref.rows}x{ref.columns}/{ref.orientation}/{echo}"
        else:
            ref.split_tag = instance or str(path)
        return ref
    except Exception as exc:
        return Skip(UNREADABLE, path, error_detail("reading header attributes", exc))


def scan_series(
    paths: Iterable[Path], policy: SkipPolicy = DEFAULT_POLICY
) -> tuple[list[SeriesRef], list[Skip]]:
    """Group DICOM files into series from their headers; files left out come back as skips.

    Files repeating an SOPInstanceUID already seen are skipped as duplicates (first wins).
    Single-frame CT/MR files group by (study, series, rows, columns, orientation, echo);
    a series mixing sizes or orientations is split into one ``SeriesRef`` per geometry
    (``split_tag`` tells them apart). Enhanced multi-frame files and radiographs are one
    ``SeriesRef`` each.
    """
    groups: dict[tuple[str, str, str], SeriesRef] = {}
    refs: list[SeriesRef] = []
    skips: list[Skip] = []
    seen: set[str] = set()  # an export may hold one instance twice (e.g. re-encoded)
    for path in paths:
        with quiet_reading():  # values are converted lazily: warnings may quote them
            ref = _scan_one(Path(path), policy, seen)
        if isinstance(ref, Skip):
            skips.append(ref)
        elif ref.kind != "slices":
            refs.append(ref)
        else:
            key = (ref.study_uid, ref.series_uid, ref.split_tag)
            if key in groups:
                groups[key].files.append(ref.source)
            else:
                groups[key] = ref
                refs.append(ref)
    return refs, skips
