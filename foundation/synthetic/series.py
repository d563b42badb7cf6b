"""Render and write one series of a synthetic study: CT, radiograph, cardiac MR, or a skip.

Each writer returns the series' ground truth (format, transfer syntax, geometry, file paths)
for ``cohort.json``; ``ExportLayout`` decides the PACS-like, meaningless file names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation.synthetic.anatomy import Anatomy, render_ct, render_mr, render_projection
from foundation.synthetic.dicom_writer import (
    SeriesInfo,
    StudyInfo,
    base_dataset,
    save,
    secondary_capture,
    set_pixels,
    set_plane,
    text_sr,
)
from foundation.synthetic.geometry import SliceStack, projection_grid
from foundation.synthetic.nifti_writer import write_nifti

# CT pixel storage variants: (dtype, BitsStored, RescaleIntercept). Stored = HU - intercept.
CT_STORAGE = {
    "uint12": (np.uint16, 12, -1024.0),
    "int16": (np.int16, 16, -1024.0),
    "int16_hu": (np.int16, 16, 0.0),
}


@dataclass
class ExportLayout:
    """Meaningless PACS-like paths under ``export/`` for one patient (three styles).

    0: ``DICOM/<p>/<study>/<series>/<8 hex>`` (no extension, one folder per series)
    1: ``<p>/<study>/IM00001.dcm`` (every series of a study in one folder)
    2: ``<p>/<16 hex>`` (no extension, every study of the patient in one folder)
    """

    export: Path
    style: int
    rng: np.random.Generator
    _dirs: dict = field(default_factory=dict)
    _count: dict = field(default_factory=dict)

    def _hex(self, n: int) -> str:
        return self.rng.bytes(n).hex().upper()

    def _dir(self, key: str, n: int) -> str:
        if key not in self._dirs:
            self._dirs[key] = self._hex(n)
        return self._dirs[key]

    def dicom_path(self, study: str, series: str) -> Path:
        p = self._dir("patient", 4)
        if self.style == 0:
            base = self.export / "DICOM" / p / self._dir(study, 4) / self._dir(study + series, 4)
        elif self.style == 1:
            base = self.export / p / self._dir(study, 3)
            self._count[study] = self._count.get(study, 0) + 1
            return base / f"IM{self._count[study]:05d}.dcm"
        else:
            base = self.export / p
        while True:
            path = base / self._hex(8).lower()
            if not path.exists():
                return path

    def nifti_stem(self) -> Path:
        return self.export / "nifti" / self._hex(6).lower()


@dataclass
class StudyWriter:
    """Writes the series of one study; ``uid(*parts)`` gives deterministic UIDs."""

    out: Path
    layout: ExportLayout
    study: StudyInfo
    rng: np.random.Generator
    uid: Callable[..., str]
    planted: list[str] = field(default_factory=list)  # UIDs and device names written

    def plant_series(self, series: SeriesInfo) -> None:
        """Record the series-level identifiers (UIDs, station, serial number)."""
        self.planted += [series.uid, series.frame_uid, series.station, series.serial]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def _sidecar(self, series: SeriesInfo) -> dict:
        s, p = self.study, self.study.ident
        return {
            "PatientID": p.ipp,
            "PatientName": p.person.dicom_pn,
            "PatientBirthDate": p.birth_date.strftime("%Y%m%d"),
            "PatientSex": p.person.sex,
            "AccessionNumber": s.accession,
            "StudyInstanceUID": s.uid,
            "SeriesInstanceUID": series.uid,
            "StudyDate": s.date.strftime("%Y%m%d"),
            "Modality": series.modality,
            "BodyPartExamined": series.body_part,
            "InstitutionName": p.hospital.name,
            "ReferringPhysicianName": p.referrer.dicom_pn,
            "StudyDescription": s.description,
            "SeriesDescription": series.description,
            "SeriesNumber": series.number,
            "Manufacturer": series.manufacturer,
            **{k: v for k, v in series.acquisition.items() if not isinstance(v, list)},
        }

    def _stack_truth(self, stack: SliceStack) -> dict:
        return {
            "shape": [len(stack.positions), stack.rows, stack.cols],
            "pixel_spacing": list(stack.spacing),
            "slice_spacing": stack.slice_spacing,
            "iop": stack.iop,
            "first_position": [float(v) for v in stack.positions[0]],
            "last_position": [float(v) for v in stack.positions[-1]],
        }

    def volume(
        self,
        series: SeriesInfo,
        stack: SliceStack,
        planes: np.ndarray,
        fmt: str,
        image_type: list[str],
        rescale: tuple[float, int] | None = None,
        dtype=np.uint16,
        bits: int = 12,
    ) -> dict:
        """Write planes (K, rows, cols) as DICOM slices or one NIfTI; ``rescale`` for CT."""
        self.plant_series(series)
        truth = {"uid": series.uid, "modality": series.modality}
        truth["format"] = "nifti" if fmt == "nifti" else "dicom"
        truth.update(self._stack_truth(stack), orientation=stack.variant)
        truth["patient_position"] = stack.patient_position
        if fmt == "nifti":
            inter = rescale[0] if rescale and dtype == np.uint16 else 0.0
            nii, js = write_nifti(
                self.layout.nifti_stem(), planes, stack, self._sidecar(series), inter
            )
            truth.update(syntax=None, paths=[self._rel(nii)], sidecar=self._rel(js))
            return truth
        paths, syntax = [], fmt
        # One dataset per series, updated per slice: building 60 elements per file is slow.
        ds = base_dataset(self.study, series, "", 1)
        ds.ImageType = image_type
        if series.modality == "CT":
            ds.PatientPosition = stack.patient_position
        if rescale is not None:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = rescale[0], 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
        for k in range(len(planes)):
            ds.SOPInstanceUID = self.uid("sop", series.uid, k)
            ds.InstanceNumber = k + 1
            self.planted.append(ds.SOPInstanceUID)
            set_plane(ds, stack, k)
            stored = planes[k] if rescale is None else (planes[k] - rescale[0]).astype(dtype)
            set_pixels(ds, stored, bits)
            path = self.layout.dicom_path(self.study.uid, series.uid)
            syntax = save(ds, path, fmt, stored)
            paths.append(self._rel(path))
        truth.update(syntax=syntax, paths=paths)
        return truth

    def ct(self, a: Anatomy, series: SeriesInfo, stack: SliceStack, fmt: str, storage: str) -> dict:
        hu = render_ct(a, stack.world_points(), (*stack.spacing, stack.slice_spacing), self.rng)
        dtype, bits, inter = CT_STORAGE[storage]
        truth = self.volume(
            series, stack, hu, fmt, ["ORIGINAL", "PRIMARY", "AXIAL"], (inter, 1), dtype, bits
        )
        truth["storage"] = storage
        return truth

    def mr(self, a: Anatomy, series: SeriesInfo, stack: SliceStack, fmt: str) -> dict:
        planes = render_mr(a, stack.world_points(), self.rng)
        return self.volume(series, stack, planes, fmt, ["ORIGINAL", "PRIMARY", "M"])

    def radiograph(
        self, a: Anatomy, series: SeriesInfo, shape: tuple[int, int], fmt: str, photometric: str
    ) -> dict:
        """Frontal chest radiograph, patient's right on the image's left (PA view)."""
        rows, cols = shape
        pixel = round(400.0 / rows, 4)
        x, z = projection_grid(rows, cols, pixel)
        v = render_projection(a, x, z)
        v = v + self.rng.normal(0.0, 0.01, size=v.shape)
        img = np.clip(np.rint(v * 3900), 0, 4095).astype(np.uint16)
        if photometric == "MONOCHROME1":  # high stored value = dark
            img = (4095 - img).astype(np.uint16)
        sop = self.uid("sop", series.uid, 0)
        self.planted.append(sop)
        self.plant_series(series)
        ds = base_dataset(self.study, series, sop, 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientOrientation = ["L", "F"]
        ds.ViewPosition = "PA"
        magnification = 1.1
        imager = round(pixel * magnification, 4)
        ds.ImagerPixelSpacing = [imager, imager]
        ds.EstimatedRadiographicMagnificationFactor = magnification
        # DX sometimes, CR always, also state the spacing at the patient.
        has_pixel_spacing = series.modality == "CR" or bool(self.rng.random() < 0.5)
        if has_pixel_spacing:
            ds.PixelSpacing = [pixel, pixel]
        if series.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        set_pixels(ds, img, 12, photometric)
        path = self.layout.dicom_path(self.study.uid, series.uid)
        syntax = save(ds, path, fmt, img)
        return {
            "uid": series.uid,
            "modality": series.modality,
            "format": "dicom",
            "syntax": syntax,
            "photometric": photometric,
            "shape": [rows, cols],
            "pixel_spacing": [pixel, pixel] if has_pixel_spacing else None,
            "imager_pixel_spacing": [imager, imager],
            "paths": [self._rel(path)],
        }

    def localizer(self, a: Anatomy, series: SeriesInfo, size: int) -> str:
        """A coronal CT scout (ImageType LOCALIZER): ingest must skip it. Returns its path."""
        pixel = round(400.0 / size, 4)
        x, z = projection_grid(size, size, pixel)
        hu = np.rint(render_projection(a, x, z) * 2000 - 1000).astype(np.int16)
        stack = SliceStack(
            rows=size,
            cols=size,
            spacing=(pixel, pixel),
            row_dir=np.array([1.0, 0.0, 0.0]),
            col_dir=np.array([0.0, 0.0, -1.0]),
            positions=np.array([[x[0], 0.0, z[0]]]),
            slice_spacing=1.0,
        )
        sop = self.uid("sop", series.uid, 0)
        self.planted.append(sop)
        self.plant_series(series)
        ds = base_dataset(self.study, series, sop, 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.PatientPosition = "HFS"
        set_plane(ds, stack, 0)
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1
        stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
        set_pixels(ds, stored, 12)
        path = self.layout.dicom_path(self.study.uid, series.uid)
        save(ds, path, "explicit", stored)
        return self._rel(path)

    def skip_object(self, series: SeriesInfo, sr_text: str | None = None) -> str:
        """A screen capture with burned-in text, or with ``sr_text`` a Basic Text SR.

        Both are objects ingest must skip; returns the file's path relative to ``out``.
        """
        sop = self.uid("sop", series.uid, 0)
        self.planted.append(sop)
        self.plant_series(series)
        if sr_text is None:
            ds, img = secondary_capture(self.study, series, sop)
        else:
            ds, img = text_sr(self.study, series, sop, sr_text), None
        path = self.layout.dicom_path(self.study.uid, series.uid)
        save(ds, path, "explicit", img)
        return self._rel(path)
