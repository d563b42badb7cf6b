"""DICOM header -> allow-listed, pseudonymised ``Sample.meta`` fields.

Nothing leaves the header unless ``ALLOWLIST`` names it, with the PS3.15 Annex E option that
allows it (``annex_e.py``; the tests hold the list against the standard's table) and the
transform applied: keep, shift the date by the patient's keyed offset, reduce to an age in
whole years capped at 90, or replace with a keyed pseudonym.

A series without PatientID raises ``DeidError("no_patient_id")`` rather than getting a
pseudonym of other data (name, birth date): such a pseudonym would split or merge patients and,
above all, could never match an opt-out request, which names patients by their ID. The caller
skips the series with that reason.

``identifier_values`` gathers every identifying text in a header, for the per-study deny-list
that ``scrub.scrub_report`` removes from the report.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from foundation.privacy.annex_e import (
    AGE_YEARS,
    BASIC_PROFILE_REPLACED,
    KEEP,
    NOT_IN_ANNEX_E,
    OPT_MODIFIED_DATES,
    OPT_PATIENT_CHARACTERISTICS,
    PSEUDONYMISE,
    SHIFT_DATE,
)
from foundation.privacy.pseudonym import PseudonymKey

AGE_CAP_YEARS = 90  # ages above 89 identify (HIPAA safe harbour); 90 means "90 or older"


class DeidError(ValueError):
    """A header cannot be pseudonymised; ``reason`` is a short code ("no_patient_id", ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot pseudonymise header: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class AllowedAttribute:
    """One header attribute that may feed ``Sample.meta``, and why."""

    keyword: str
    tag: int
    meta_field: str  # the Sample.meta field it feeds
    option: str  # Annex E option allowing it, BASIC_PROFILE_REPLACED or NOT_IN_ANNEX_E
    transform: str  # KEEP | SHIFT_DATE | AGE_YEARS | PSEUDONYMISE
    annex_e_as: str | None = None  # the attribute the output is, when not the input itself


def _allow(kw: str, field: str, option: str, transform: str, as_: str | None = None):
    return kw, AllowedAttribute(kw, tag_for_keyword(kw), field, option, transform, as_)


# Acquisition parameters: numbers and coded strings, none listed by Annex E. Free-text
# attributes (descriptions, protocol names, contrast agent) stay out: they may hold names.
ACQUISITION_KEYWORDS: tuple[str, ...] = (
    # CT
    "KVP", "XRayTubeCurrent", "ExposureTime", "Exposure", "ExposureInuAs", "CTDIvol",
    "SpiralPitchFactor", "ConvolutionKernel", "FilterType", "ReconstructionDiameter",
    "SliceThickness", "SpacingBetweenSlices",
    # MR
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "EchoTrainLength", "ImagingFrequency", "ImagedNucleus", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "PixelBandwidth",
    # X-ray
    "ViewPosition", "DistanceSourceToDetector", "DistanceSourceToPatient",
    # all
    "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation",
)  # fmt: skip

ALLOWLIST: dict[str, AllowedAttribute] = dict(
    [
        _allow("PatientID", "patient", BASIC_PROFILE_REPLACED, PSEUDONYMISE),
        _allow("StudyInstanceUID", "study", BASIC_PROFILE_REPLACED, PSEUDONYMISE),
        _allow("AccessionNumber", "accession", BASIC_PROFILE_REPLACED, PSEUDONYMISE),
        _allow("Modality", "source_modality", NOT_IN_ANNEX_E, KEEP),
        _allow("BodyPartExamined", "body_part", NOT_IN_ANNEX_E, KEEP),
        # The first present of these gives the study date, shifted per patient.
        _allow("StudyDate", "study_date", OPT_MODIFIED_DATES, SHIFT_DATE),
        _allow("SeriesDate", "study_date", OPT_MODIFIED_DATES, SHIFT_DATE),
        _allow("AcquisitionDate", "study_date", OPT_MODIFIED_DATES, SHIFT_DATE),
        _allow("ContentDate", "study_date", OPT_MODIFIED_DATES, SHIFT_DATE),
        _allow("PatientAge", "age_years", OPT_PATIENT_CHARACTERISTICS, AGE_YEARS),
        # Read only to compute the age (output is a Patient's Age); the date never leaves.
        _allow(
            "PatientBirthDate", "age_years", OPT_PATIENT_CHARACTERISTICS, AGE_YEARS, "PatientAge"
        ),
        _allow("PatientSex", "sex", OPT_PATIENT_CHARACTERISTICS, KEEP),
        *(_allow(kw, "acquisition", NOT_IN_ANNEX_E, KEEP) for kw in ACQUISITION_KEYWORDS),
    ]
)

_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
_CS_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")  # DICOM Code String
_AGE_RE = re.compile(r"^(\d{1,3})([DWMY])$")
_MAX_TEXT = 64  # longest string kept in meta["acquisition"]


def _text(header: pydicom.Dataset, keyword: str) -> str:
    """The element's value as a stripped string ("" when absent or empty)."""
    value = header.get(keyword)
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="ignore")
    return str(value).strip().strip("\x00").strip()


def parse_da(value: Any) -> dt.date | None:
    """A DICOM DA value ("YYYYMMDD", or ACR-NEMA "YYYY.MM.DD") as a date, None if invalid."""
    if isinstance(value, dt.date):
        return value
    s = str(value or "").strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", s):
        return None
    try:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return None


def _study_date(header: pydicom.Dataset) -> dt.date | None:
    for kw in _DATE_KEYWORDS:
        date = parse_da(header.get(kw))
        if date is not None:
            return date
    return None


def _age_years(header: pydicom.Dataset, study_date: dt.date | None) -> int | None:
    """Whole years at the study, from the birth date, else from PatientAge; capped at 90."""
    years: int | None = None
    birth = parse_da(header.get("PatientBirthDate"))
    if birth is not None and study_date is not None and birth <= study_date:
        years = study_date.year - birth.year
        years -= (study_date.month, study_date.day) < (birth.month, birth.day)
    else:
        m = _AGE_RE.match(_text(header, "PatientAge").upper())
        if m:
            n, unit = int(m[1]), m[2]
            years = {"Y": n, "M": n // 12, "W": n * 7 // 365, "D": n // 365}[unit]
    return None if years is None else min(years, AGE_CAP_YEARS)


def _sex(header: pydicom.Dataset) -> str | None:
    sex = _text(header, "PatientSex").upper()
    return sex if sex in {"M", "F", "O"} else None


def _code_string(header: pydicom.Dataset, keyword: str) -> str | None:
    value = _text(header, keyword).upper()
    return value if _CS_RE.match(value) else None


def _json_value(elem: DataElement) -> Any:
    """A plain JSON number/string (or list of them) for a technical element, None if unfit."""
    raw = elem.value
    values = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
    out: list[Any] = []
    for v in values:
        if isinstance(v, bytes | pydicom.Sequence | pydicom.Dataset) or v is None:
            return None
        if isinstance(v, int | float) and not isinstance(v, bool):
            # DSfloat / IS are float / int subclasses; JSON wants the plain types
            num = int(v) if isinstance(v, int) else float(v)
            if isinstance(num, float) and not math.isfinite(num):
                return None
            out.append(num)
        else:
            s = str(v).strip()
            if not s or len(s) > _MAX_TEXT or not s.isprintable():
                return None
            out.append(s)
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def _acquisition(header: pydicom.Dataset, names: set[str]) -> dict[str, Any]:
    """Allow-listed acquisition parameters; strings that echo a header name are dropped."""
    acq: dict[str, Any] = {}
    for kw in ACQUISITION_KEYWORDS:
        elem = header.get(tag_for_keyword(kw))  # by tag: the element, not its value
        if elem is None or elem.value in (None, "", b""):
            continue
        value = _json_value(elem)
        if value is None:
            continue
        text = " ".join(str(v) for v in (value if isinstance(value, list) else [value])).lower()
        # Defence in depth: a name typed into a technical field (it happens) stays home.
        if any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text) for n in names):
            continue
        acq[kw] = value
    return acq


def patient_pseudonym(header: pydicom.Dataset, key: PseudonymKey) -> str | None:
    """The patient pseudonym ``pseudonymised_meta`` gives this header; None without PatientID.

    Ingest checks it against the exclusion list on a header-only read, before any pixel.
    """
    patient_id = _text(header, "PatientID")
    return key.patient(patient_id) if patient_id else None


def pseudonymised_meta(header: pydicom.Dataset, key: PseudonymKey) -> dict[str, Any]:
    """The allow-listed ``Sample.meta`` fields of a series header.

    Returns patient, study, accession (pseudonyms; accession None when absent), key_id,
    source_modality, body_part, study_date (shifted ISO date or None), age_years (capped at
    90, None if unknown), sex ("M"|"F"|"O"|None) and acquisition (dict of technical values).
    Raises ``DeidError`` ("no_patient_id", "no_study_uid") when the series cannot be keyed.
    """
    patient_id = _text(header, "PatientID")
    if not patient_id:
        raise DeidError("no_patient_id")
    study_uid = _text(header, "StudyInstanceUID")
    if not study_uid:
        raise DeidError("no_study_uid")
    accession = _text(header, "AccessionNumber")
    date = _study_date(header)
    names = {v.lower() for v in _person_name_values(header) if len(v) >= 3}
    return {
        "patient": key.patient(patient_id),
        "study": key.pseudonym("study", study_uid),
        "accession": key.pseudonym("accession", accession) if accession else None,
        "key_id": key.key_id,
        "source_modality": _code_string(header, "Modality"),
        "body_part": _code_string(header, "BodyPartExamined"),
        "study_date": key.shift_date(patient_id, date).isoformat() if date else None,
        "age_years": _age_years(header, date),
        "sex": _sex(header),
        "acquisition": _acquisition(header, names),
    }


# ---------------------------------------------------------------------------------------------
# Identifying values, for the report deny-list
# ---------------------------------------------------------------------------------------------

_TEXT_VRS = frozenset({"PN", "LO", "SH", "DA", "DT", "TM", "UI", "AE", "ST", "LT", "UT", "UC"})
# Clinical or technical vocabulary that reports repeat: denying it would blank "thorax" or
# "T2" from every report of the study. Names in them are caught through the PN values.
_VOCABULARY_KEYWORDS = frozenset(
    {
        "StudyDescription", "SeriesDescription", "ProtocolName", "BodyPartExamined",
        "PerformedProcedureStepDescription", "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription", "CodeMeaning", "CodeValue",
        "CodingSchemeDesignator", "CodingSchemeVersion", "ContextIdentifier", "MappingResource",
        "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "FilterType",
        "SequenceName", "SoftwareVersions", "ReceiveCoilName", "TransmitCoilName",
        "ContrastBolusAgent", "ImageType", "SpecificCharacterSet", "SOPClassUID",
        "MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID",
        "ImplementationVersionName", "ReferencedSOPClassUID", "PositionReferenceIndicator",
        "AcquisitionContrast", "ScanOptions", "PatientPosition", "ROIName", "BeamName",
        "RTPlanLabel", "RTPlanName", "StructureSetLabel", "StructureSetName", "SeriesType",
    }
)  # fmt: skip
_TRIVIAL = frozenset({"yes", "no", "none", "null", "unknown", "other", "anonymous", "n/a", "na"})
_PARTICLES = frozenset({"de", "du", "des", "la", "le", "les", "van", "von", "der", "den", "di", "da", "del", "dos", "el", "al", "y", "e", "d", "l"})  # fmt: skip
_MONTHS_FR = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
              "septembre", "octobre", "novembre", "décembre")  # fmt: skip
_MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December")  # fmt: skip


def _elements(ds: pydicom.Dataset) -> Iterator[DataElement]:
    """Every element, nested sequences and private tags included (file meta too)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta.iterall()
    yield from ds.iterall()


def _person_name_values(ds: pydicom.Dataset) -> set[str]:
    out: set[str] = set()
    for elem in _elements(ds):
        if elem.VR == "PN" and elem.value:
            for v in elem.value if elem.VM > 1 else [elem.value]:
                out |= name_parts(v)
    return out


def name_parts(value: Any) -> set[str]:
    """A PN value, its family and given names, their words, and both word orders."""
    pn = value if isinstance(value, PersonName) else PersonName(str(value))
    family = (pn.family_name or "").strip()
    given = " ".join(p for p in (pn.given_name, pn.middle_name) if p).strip()
    parts = {str(pn).strip(), family, given, f"{given} {family}", f"{family} {given}"}
    for comp in (family, given):
        parts |= set(re.split(r"[\s\-]+", comp))
    return {p.strip() for p in parts if len(p.strip()) >= 2 and p.strip().lower() not in _PARTICLES}


def date_forms(date: dt.date) -> set[str]:
    """The ways a report may write ``date``."""
    d, m, y = date.day, date.month, date.year
    return {
        f"{d:02d}/{m:02d}/{y}", f"{d}/{m}/{y}", f"{d:02d}/{m:02d}/{y % 100:02d}",
        f"{y}-{m:02d}-{d:02d}", f"{d:02d}-{m:02d}-{y}", f"{d:02d}.{m:02d}.{y}", f"{y}{m:02d}{d:02d}",
        f"{d} {_MONTHS_FR[m - 1]} {y}", f"{d} {_MONTHS_EN[m - 1]} {y}",
        f"{_MONTHS_EN[m - 1]} {d}, {y}",
    }  # fmt: skip


def _raw_strings(elem: DataElement) -> list[str]:
    value = elem.value
    if isinstance(value, bytes):  # UN (private tags read without a dictionary)
        value = value.decode("latin-1", errors="ignore").replace("\x00", " ").split("\\")
    elif isinstance(value, MultiValue | list | tuple):
        value = list(value)
    else:
        value = [value]
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def _is_trivial(s: str) -> bool:
    if len(s) < 3 or s.lower() in _TRIVIAL:
        return True
    # short numbers (counts, flags, "0.5") identify nobody and would blank measurements
    return bool(re.fullmatch(r"[\d\s.,:+\-]+", s)) and sum(c.isdigit() for c in s) < 5


def identifier_values(header: pydicom.Dataset) -> set[str]:
    """Every identifying text value of ``header``: the study's report deny-list. Never log it.

    PN, LO, SH, DA, DT, TM, UI, AE, ST, LT (and UT, UC, text-like UN) values, nested
    sequences and private tags included, plus name parts of PN values and dates in the forms
    reports write them. Descriptions and coded vocabulary are left out (see above), as are
    values too short or too generic to identify anyone.
    """
    out: set[str] = set()
    for elem in _elements(header):
        if elem.keyword in _VOCABULARY_KEYWORDS or elem.keyword.endswith("Description"):
            continue
        vr = elem.VR
        if vr == "UN" and isinstance(elem.value, bytes):
            strings = [s for s in _raw_strings(elem) if s.isprintable()]
        elif vr in _TEXT_VRS:
            strings = _raw_strings(elem)
        else:
            continue
        for s in strings:
            if vr == "PN":
                out |= name_parts(s)
                continue
            if vr in {"DA", "DT"}:
                date = parse_da(s[:8])
                if date is not None:
                    out |= date_forms(date)
            if not _is_trivial(s):
                out.add(s)
    return {v for v in out if len(v) >= 2}
