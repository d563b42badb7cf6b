"""Allow-listed, pseudonymised metadata: no identifier leaves, and the list obeys Annex E."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pydicom import Dataset, Sequence, dcmread
from pydicom.data import get_testdata_file

from foundation.privacy.annex_e import (
    AGE_YEARS,
    KEEP,
    OPT_MODIFIED_DATES,
    OPT_PATIENT_CHARACTERISTICS,
    PSEUDONYMISE,
    SHIFT_DATE,
    load_annex_e,
    permits,
    unretainable,
)
from foundation.privacy.deid import (
    ALLOWLIST,
    DeidError,
    identifier_values,
    pseudonymised_meta,
)
from foundation.privacy.pseudonym import PseudonymKey
from foundation.sample import META_FIELDS

ANNEX_E = Path(__file__).parents[1].parent / "shared" / "dicom" / "confidentiality_profile_attributes.json"  # fmt: skip
EXPECTED_FIELDS = {
    "patient", "study", "accession", "key_id", "source_modality", "body_part", "study_date",
    "age_years", "sex", "acquisition",
}  # fmt: skip
KEY = PseudonymKey(b"test-key-0123456789abcdef")
OTHER_KEY = PseudonymKey(b"another-key-0123456789abc")

# Every identifying value the header below holds (and the forms a leak would take).
IDENTIFIERS = [
    "DUPONT", "Jean-Pierre", "Jean", "Pierre", "IPP8001234", "19510312", "1951-03-12",
    "12/03/1951", "20240115", "2024-01-15", "ACC998877", "CHU Sainte-Anne", "Sainte-Anne",
    "LEFEBVRE", "Marie", "MARTINEAU", "ROUSSEL", "Valentin", "1.2.826.0.1.3680043.8.498.777",
    "42 rue des Lilas", "0612345678",
]  # fmt: skip


def make_header(**overrides) -> Dataset:
    """A CT header with direct identifiers everywhere, private and nested ones included."""
    ds = Dataset()
    ds.PatientName = "DUPONT^Jean-Pierre"
    ds.PatientID = "IPP8001234"
    ds.PatientBirthDate = "19510312"
    ds.PatientSex = "M"
    ds.PatientAddress = "42 rue des Lilas"
    ds.PatientTelephoneNumbers = "0612345678"
    ds.StudyDate = "20240115"
    ds.SeriesDate = "20240115"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.777"
    ds.AccessionNumber = "ACC998877"
    ds.InstitutionName = "CHU Sainte-Anne"
    ds.ReferringPhysicianName = "LEFEBVRE^Marie"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "THORAX INJ"
    ds.KVP = "120"
    ds.SliceThickness = "1.25"
    ds.ConvolutionKernel = ["B30f", "3"]
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "MARTINEAU Edition"  # a name typed into a technical field
    ds.OperatorsName = "MARTINEAU^Luc"
    block = ds.private_block(0x0009, "ACME HOSPITAL", create=True)
    block.add_new(0x10, "LO", "ROUSSEL Valentin")  # private tag with a name
    item = Dataset()
    item.NameOfPhysiciansReadingStudy = "ROUSSEL^Valentin"  # nested sequence with a name
    ds.RequestAttributesSequence = Sequence([item])
    for k, v in overrides.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def test_meta_holds_only_allowed_fields_and_no_identifier() -> None:
    meta = pseudonymised_meta(make_header(), KEY)
    assert set(meta) == EXPECTED_FIELDS
    assert set(meta) <= META_FIELDS
    dumped = json.dumps(meta).lower()
    for value in IDENTIFIERS:
        assert value.lower() not in dumped, "an identifier reached meta"
    # the values it should hold
    assert meta["patient"] == KEY.patient("IPP8001234")
    assert meta["study"] == KEY.pseudonym("study", "1.2.826.0.1.3680043.8.498.777")
    assert meta["accession"] is not None and meta["key_id"] == KEY.key_id
    assert (meta["source_modality"], meta["body_part"], meta["sex"]) == ("CT", "CHEST", "M")
    assert meta["age_years"] == 72
    acq = meta["acquisition"]
    assert acq["KVP"] == 120 and acq["SliceThickness"] == 1.25
    assert acq["ConvolutionKernel"] == ["B30f", "3"] and acq["Manufacturer"] == "SIEMENS"
    assert "ManufacturerModelName" not in acq  # it echoed the operator's name
    assert all(type(v) in (int, float, str, list) for v in acq.values())
    assert set(acq) <= {k for k, a in ALLOWLIST.items() if a.meta_field == "acquisition"}


def test_pseudonyms_stable_and_key_dependent() -> None:
    a, b = pseudonymised_meta(make_header(), KEY), pseudonymised_meta(make_header(), KEY)
    other = pseudonymised_meta(make_header(), OTHER_KEY)
    assert a == b
    for field in ("patient", "study", "accession", "key_id"):
        assert a[field] != other[field]


def test_date_intervals_between_studies_are_kept() -> None:
    first = pseudonymised_meta(make_header(StudyDate="20240115"), KEY)
    later = pseudonymised_meta(make_header(StudyDate="20240704"), KEY)
    real = dt.date(2024, 7, 4) - dt.date(2024, 1, 15)
    shifted = dt.date.fromisoformat(later["study_date"]) - dt.date.fromisoformat(
        first["study_date"]
    )
    assert shifted == real
    assert first["study_date"] != "2024-01-15"  # the shift is never 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_study_date_falls_back_to_series_date_and_none() -> None:
    meta = pseudonymised_meta(make_header(StudyDate=None, SeriesDate="20240115"), KEY)
    assert meta["study_date"] == KEY.shift_date("IPP8001234", dt.date(2024, 1, 15)).isoformat()
    assert pseudonymised_meta(make_header(StudyDate="garbage", SeriesDate=None), KEY)["study_date"] is None  # fmt: skip


@pytest.mark.parametrize(
    ("birth", "study", "age_str", "expected"),
    [
        ("19200101", "20240115", None, 90),  # 104 -> capped
        ("19330116", "20240115", None, 90),  # 90 exactly
        ("19800616", "20240615", None, 43),  # birthday tomorrow
        ("19800615", "20240615", None, 44),  # birthday today
        (None, "20240115", "065Y", 65),
        (None, "20240115", "095Y", 90),
        (None, "20240115", "018M", 1),
        (None, None, None, None),
        ("20300101", "20240115", None, None),  # born after the study: unknown
    ],
)
def test_age_years(birth, study, age_str, expected) -> None:
    header = make_header(PatientBirthDate=birth, StudyDate=study, SeriesDate=None)
    if age_str:
        header.PatientAge = age_str
    assert pseudonymised_meta(header, KEY)["age_years"] == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(("raw", "expected"), [("F", "F"), ("m", "M"), ("O", "O"), ("", None), ("U", None)])  # fmt: skip
def test_sex(raw, expected) -> None:
    assert pseudonymised_meta(make_header(PatientSex=raw), KEY)["sex"] == expected


@pytest.mark.parametrize("patient_id", [None, "", "   "])
def test_missing_patient_id_raises_without_leaking(patient_id) -> None:
    with pytest.raises(DeidError) as info:
        pseudonymised_meta(make_header(PatientID=patient_id), KEY)
    assert info.value.reason == "no_patient_id"
    assert "DUPONT" not in str(info.value) and "1.2.826" not in str(info.value)


def test_missing_accession_and_study_uid() -> None:
    assert pseudonymised_meta(make_header(AccessionNumber=None), KEY)["accession"] is None
    with pytest.raises(DeidError) as info:
        pseudonymised_meta(make_header(StudyInstanceUID=None), KEY)
    assert info.value.reason == "no_study_uid"


def test_identifier_values_cover_names_dates_private_and_nested() -> None:
    values = identifier_values(make_header())
    lowered = {v.lower() for v in values}
    for expected in ["DUPONT", "Jean-Pierre", "Jean", "Pierre", "Jean-Pierre DUPONT",
                     "IPP8001234", "ACC998877", "CHU Sainte-Anne", "LEFEBVRE", "Marie",
                     "ROUSSEL Valentin", "ROUSSEL", "Valentin", "42 rue des Lilas", "0612345678",
                     "12/03/1951", "1951-03-12", "12.03.1951", "19510312", "15/01/2024",
                     "1.2.826.0.1.3680043.8.498.777", "ACME HOSPITAL"]:  # fmt: skip
        assert expected.lower() in lowered, expected
    # clinical vocabulary and trivial values stay out of the deny-list
    assert "thorax inj" not in lowered and "chest" not in lowered and "b30f" not in lowered
    assert all(len(v) >= 2 for v in values) and "3" not in values and "120" not in values


def test_real_dicom_file_leaks_nothing() -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    meta = pseudonymised_meta(ds, KEY)
    dumped = json.dumps(meta).lower()
    for value in identifier_values(ds):
        if len(value) >= 4:
            assert value.lower() not in dumped
    assert meta["source_modality"] == "CT" and meta["patient"] == KEY.patient(ds.PatientID)


# ----------------------------------------------------------------------------------------
# The allow-list against DICOM PS3.15 Annex E
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annex_e():
    if not ANNEX_E.is_file():
        pytest.skip(f"Annex E table not found at {ANNEX_E} (clone the repo with shared/ beside it)")
    return load_annex_e(ANNEX_E)


def test_allowlist_obeys_annex_e(annex_e) -> None:
    for kw, attr in ALLOWLIST.items():
        assert attr.keyword == kw and attr.meta_field in META_FIELDS
        entry = annex_e.get(attr.annex_e_as or kw)
        assert permits(entry, attr.option, attr.transform), (kw, attr.option, attr.transform)


def test_direct_identifiers_never_kept(annex_e) -> None:
    cited = tuple({a.option for a in ALLOWLIST.values()})
    never = unretainable(annex_e, cited)
    direct = {"PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName",
              "ReferringPhysicianName", "PatientBirthDate", "PatientAddress", "StationName",
              "DeviceSerialNumber", "StudyInstanceUID", "OperatorsName", "StudyDescription"}  # fmt: skip
    assert direct <= never
    for kw in never & set(ALLOWLIST):
        assert ALLOWLIST[kw].transform != KEEP, kw
        assert ALLOWLIST[kw].transform == PSEUDONYMISE or ALLOWLIST[kw].annex_e_as, kw


def test_permits_rejects_what_the_standard_does_not_allow(annex_e) -> None:
    assert permits(annex_e["PatientSex"], OPT_PATIENT_CHARACTERISTICS, KEEP)
    assert not permits(annex_e["PatientName"], OPT_PATIENT_CHARACTERISTICS, KEEP)
    assert not permits(annex_e["StudyDate"], OPT_MODIFIED_DATES, KEEP)  # C: modified only
    assert permits(annex_e["StudyDate"], OPT_MODIFIED_DATES, SHIFT_DATE)
    assert not permits(annex_e["PatientBirthDate"], OPT_PATIENT_CHARACTERISTICS, AGE_YEARS)
    assert not permits(annex_e["StationName"], OPT_PATIENT_CHARACTERISTICS, KEEP)
