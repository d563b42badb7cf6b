"""DICOM PS3.15 Annex E (table E.1-1): which attributes the confidentiality profile removes,
and which of its options allow keeping (or modifying) them.

The table ships outside the package (``../shared/dicom/confidentiality_profile_attributes.json``,
a machine-readable copy of the standard's table); this module reads it and answers one
question: *does the option we cite permit the transform we apply to this attribute?* The test
suite uses it to hold ``deid.ALLOWLIST`` against the standard.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_for_tag

# Option names (as the standard writes them) -> column of the JSON table.
OPT_PATIENT_CHARACTERISTICS = "Retain Patient Characteristics Option"
OPT_MODIFIED_DATES = "Retain Longitudinal Temporal Information with Modified Dates Option"
OPT_FULL_DATES = "Retain Longitudinal Temporal Information with Full Dates Option"
OPT_DEVICE_IDENTITY = "Retain Device Identity Option"
OPT_INSTITUTION_IDENTITY = "Retain Institution Identity Option"
OPT_UIDS = "Retain UIDs Option"
OPT_CLEAN_DESCRIPTORS = "Clean Descriptors Option"
# Not options of the standard, but the two other reasons an attribute may feed our metadata:
BASIC_PROFILE_REPLACED = "Basic Profile (replaced by a keyed pseudonym: U/D/Z)"
NOT_IN_ANNEX_E = "not in Annex E (technical)"

OPTION_COLUMNS: dict[str, str] = {
    OPT_PATIENT_CHARACTERISTICS: "rtnPatCharsOpt",
    OPT_MODIFIED_DATES: "rtnLongModifDatesOpt",
    OPT_FULL_DATES: "rtnLongFullDatesOpt",
    OPT_DEVICE_IDENTITY: "rtnDevIdOpt",
    OPT_INSTITUTION_IDENTITY: "rtnInstIdOpt",
    OPT_UIDS: "rtnUIDsOpt",
    OPT_CLEAN_DESCRIPTORS: "cleanDescOpt",
    "Clean Graphics Option": "cleanGraphOpt",
    "Clean Structured Content Option": "cleanStructContOpt",
    "Retain Safe Private Option": "rtnSafePrivOpt",
}

# Transforms ``deid`` applies (kept in sync with deid.ALLOWLIST).
KEEP = "keep"
SHIFT_DATE = "shift_date"
AGE_YEARS = "age_years_capped_90"
PSEUDONYMISE = "pseudonymise"
TRANSFORMS = frozenset({KEEP, SHIFT_DATE, AGE_YEARS, PSEUDONYMISE})

_TAG_RE = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")


class AnnexEError(ValueError):
    """The Annex E table could not be read."""


@dataclass(frozen=True)
class AnnexEEntry:
    """One row of table E.1-1."""

    name: str
    tag: int | None  # None for group patterns such as "(50XX,XXXX)"
    keyword: str | None
    basic_profile: str  # "X", "Z", "D", "U", "X/Z", ...
    options: dict[str, str] = field(default_factory=dict)  # JSON column -> code (K, C)

    def code(self, option: str) -> str | None:
        """Action code of ``option`` (an option name of ``OPTION_COLUMNS``) for this row."""
        return self.options.get(OPTION_COLUMNS[option])

    @property
    def basic_codes(self) -> frozenset[str]:
        """Basic-profile codes as a set: "X/Z/U*" -> {"X", "Z", "U"}."""
        return frozenset(c.strip("*") for c in self.basic_profile.split("/"))


def load_annex_e(path: str | os.PathLike) -> dict[str, AnnexEEntry]:
    """Table E.1-1 keyed by DICOM keyword (rows with tag patterns are keyed by their name)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnexEError(f"{path}: cannot read Annex E table ({type(exc).__name__})") from None
    if not isinstance(rows, list):
        raise AnnexEError(f"{path}: expected a JSON list of attributes")
    columns = set(OPTION_COLUMNS.values())
    table: dict[str, AnnexEEntry] = {}
    for row in rows:
        m = _TAG_RE.match(str(row.get("tag", "")))
        tag = int(m[1] + m[2], 16) if m else None
        keyword = (keyword_for_tag(tag) or None) if tag is not None else None
        entry = AnnexEEntry(
            name=str(row.get("name", "")),
            tag=tag,
            keyword=keyword,
            basic_profile=str(row.get("basicProfile", "")),
            options={k: str(v) for k, v in row.items() if k in columns and v},
        )
        table[keyword or entry.name] = entry
    return table


def permits(entry: AnnexEEntry | None, option: str, transform: str) -> bool:
    """Whether ``option`` allows ``transform`` on an attribute with this Annex E ``entry``.

    - a retaining option: ``keep`` needs code K; ``shift_date`` and ``age`` (modified values)
      need K or C (C: "clean", i.e. keep a modified value, as dates under modified-dates);
    - ``BASIC_PROFILE_REPLACED``: only ``pseudonymise``, and the basic profile must already
      replace the value (U new UID, D dummy, Z empty-or-dummy): a keyed pseudonym is such a
      consistent replacement, never the original value;
    - ``NOT_IN_ANNEX_E``: the attribute must be absent from the table.
    """
    if transform not in TRANSFORMS:
        return False
    if option == NOT_IN_ANNEX_E:
        return entry is None
    if entry is None:
        return False
    if option == BASIC_PROFILE_REPLACED:
        return transform == PSEUDONYMISE and bool(entry.basic_codes & {"U", "D", "Z"})
    if option not in OPTION_COLUMNS or transform == PSEUDONYMISE:
        return False
    code = entry.code(option)
    if transform == KEEP:
        return code == "K"
    return code in {"K", "C"}


def unretainable(table: dict[str, AnnexEEntry], options: tuple[str, ...]) -> frozenset[str]:
    """Keywords the basic profile removes or replaces and none of ``options`` retains.

    With the options ``deid`` cites this holds the direct identifiers (PatientName, PatientID,
    OtherPatientIDs, AccessionNumber, ReferringPhysicianName, InstitutionName, ...): none of
    them may ever be kept as is.
    """
    columns = {OPTION_COLUMNS[o] for o in options if o in OPTION_COLUMNS}
    return frozenset(
        kw
        for kw, entry in table.items()
        if entry.keyword is not None and not any(col in columns for col in entry.options)
    )
