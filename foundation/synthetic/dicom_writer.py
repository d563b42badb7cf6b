"""DICOM Part 10 files for the synthetic cohort (pydicom), identifiers planted as a PACS would.

Every file carries the Patient / Study / Series / Equipment modules with direct identifiers
(names, IDs, dates, addresses, phone numbers), a private block (group 0x0009) repeating the
patient's name and ID, and a nested sequence holding a person name, so de-identification is
tested where real exports hide identifiers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from foundation.synthetic.geometry import SliceStack
from foundation.synthetic.identities import (
    PatientIdentity,
    institution_address,
    patient_address,
    phone_forms,
)

PRIVATE_CREATOR = "SYNTHETIC PACS 1.0"
SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "OT": SecondaryCaptureImageStorage,
    "SR": BasicTextSRStorage,
}
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "rle": RLELossless,
}


@dataclass
class StudyInfo:
    """Study-level header values (shared by every file of the study)."""

    ident: PatientIdentity
    uid: str
    accession: str
    date: dt.date
    time: str  # HHMMSS
    description: str
    study_id: str
    charset: str  # "ISO_IR 192" (UTF-8) or "ISO_IR 100" (Latin-1)


@dataclass
class SeriesInfo:
    """Series-level header values."""

    uid: str
    number: int
    modality: str  # CT, MR, CR, DX, OT, SR
    description: str
    body_part: str
    frame_uid: str
    manufacturer: str
    model: str
    station: str
    serial: str
    acquisition: dict[str, Any] = field(default_factory=dict)  # keyword -> value
    plant_other_ids: bool = False  # OtherPatientIDsSequence with the NIR


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def base_dataset(
    study: StudyInfo, series: SeriesInfo, sop_uid: str, instance: int, sop_class: str | None = None
) -> Dataset:
    """Patient, study, series, equipment and SOP common modules with planted identifiers."""
    p, h = study.ident, study.ident.hospital
    ds = Dataset()
    ds.SpecificCharacterSet = study.charset
    ds.SOPClassUID = sop_class or SOP_CLASSES[series.modality]
    ds.SOPInstanceUID = sop_uid
    date = study.date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = series.manufacturer
    ds.InstitutionName = h.name
    ds.InstitutionAddress = institution_address(h)
    ds.ReferringPhysicianName = p.referrer.dicom_pn
    ds.StationName = series.station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = "Radiologie"
    ds.PerformingPhysicianName = p.radiologist.dicom_pn
    ds.OperatorsName = p.operator.dicom_pn
    ds.ManufacturerModelName = series.model
    ds.PatientName = p.person.dicom_pn
    ds.PatientID = p.ipp
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = p.person.sex
    ds.PatientAge = _age(p.birth_date, study.date)
    ds.PatientAddress = patient_address(p)
    ds.PatientTelephoneNumbers = phone_forms(p.phone)[0]
    if series.plant_other_ids:
        other = Dataset()
        other.PatientID = p.nir
        other.IssuerOfPatientID = "INSEE"
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
    ds.DeviceSerialNumber = series.serial
    ds.BodyPartExamined = series.body_part
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance
    if series.modality not in ("SR",):
        ds.FrameOfReferenceUID = series.frame_uid
        ds.PositionReferenceIndicator = ""
    for keyword, value in series.acquisition.items():
        setattr(ds, keyword, value)
    # A nested sequence holding a person name, as request attributes do.
    request = Dataset()
    request.RequestedProcedureID = study.accession
    request.ScheduledProcedureStepID = f"SPS{study.study_id}"
    request.RequestedProcedureDescription = study.description
    request.RequestingPhysician = p.referrer.dicom_pn
    ds.RequestAttributesSequence = Sequence([request])
    # A private block repeating the name and ID: Annex E says remove private tags.
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", p.person.dicom_pn)
    block.add_new(0x11, "LO", p.ipp)
    return ds


def set_pixels(
    ds: Dataset, arr: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2"
) -> None:
    """Image Pixel module for a single-frame grayscale ``arr`` (rows, cols)."""
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def set_plane(ds: Dataset, stack: SliceStack, k: int) -> None:
    """Image Plane module of plane ``k`` of a stack."""
    ds.ImagePositionPatient = [round(float(v), 4) for v in stack.positions[k]]
    ds.ImageOrientationPatient = stack.iop
    ds.PixelSpacing = [float(stack.spacing[0]), float(stack.spacing[1])]
    ds.SliceThickness = float(stack.slice_spacing)
    ds.SpacingBetweenSlices = float(stack.slice_spacing)
    ds.SliceLocation = round(float(np.dot(stack.positions[k], stack.normal)), 4)


def save(ds: Dataset, path: Path, syntax: str, arr: np.ndarray | None = None) -> str:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta); returns the syntax used.

    ``syntax``: explicit | implicit | j2k | rle. JPEG 2000 lossless is encoded by
    pylibjpeg-openjpeg; if that encoder is unavailable, or the image is under 32 pixels a side,
    the file falls back to RLE lossless (the returned syntax says which).
    """
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == "j2k" and min(arr.shape) < 32:
        syntax = "rle"  # openjpeg's default 6 resolution levels need tiles of 32 pixels or more
    if syntax == "j2k":
        try:
            ds.compress(
                JPEG2000Lossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False
            )
        except (RuntimeError, ValueError, ImportError):
            syntax = "rle"
    if syntax == "rle":
        ds.compress(RLELossless, arr, generate_instance_uid=False)  # UIDs stay seeded
    elif syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return syntax


def text_sr(study: StudyInfo, series: SeriesInfo, sop_uid: str, text: str) -> Dataset:
    """A Basic Text SR holding a report line: a non-image object ingest must skip."""
    ds = base_dataset(study, series, sop_uid, 1)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = text
    ds.ContentSequence = Sequence([item])
    return ds


def secondary_capture(study: StudyInfo, series: SeriesInfo, sop_uid: str, size: int = 64):
    """A screen capture with burned-in text (BurnedInAnnotation YES): ingest must skip it."""
    ds = base_dataset(study, series, sop_uid, 1)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    img = np.zeros((size, size), dtype=np.uint8)
    img[4:10, 4 : size - 4] = 255  # a "text line" across the top
    img[size // 3 :, size // 4 : 3 * size // 4] = 120
    set_pixels(ds, img, 8)
    return ds, img
