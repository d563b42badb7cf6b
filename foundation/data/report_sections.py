"""The parts of a radiology report that describe the images: findings and conclusion.

A report opens with a header (hospital, patient, referring physician: placeholders once
scrubbed), an indication and often a technique paragraph, and closes with a signature. These
are the same in every report of a department, so in a contrastive batch they only cost tokens:
with a 128-token budget the header alone can take half of it, and what tells two exams apart
(the findings) gets truncated. Image-report pretraining therefore learns from the findings and
conclusion sections, as the CLIP models of chest radiographs do (MIMIC-CXR "findings" and
"impression").

Sections are found by their headings, in French or English, at the start of a line and
followed by a colon (``Résultats :``, ``CONCLUSION:``, ``Findings:``). A report with none of the
wanted headings is kept whole: a free-text report is better than an empty one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# Headings per section, normalised (lower case, no accents).
_SECTION_HEADINGS: dict[str, tuple[str, ...]] = {
    "indication": (
        "indication", "indications", "motif", "motif de l'examen", "renseignements cliniques",
        "contexte", "clinical history", "history", "reason for exam", "clinical information",
    ),
    "technique": ("technique", "protocole", "protocol", "technique d'examen"),
    "comparison": (
        "comparaison", "comparison", "examen de reference", "anteriorite", "anteriorites",
    ),
    "findings": (
        "resultats", "resultat", "description", "constatations", "analyse", "findings",
        "observations",
    ),
    "conclusion": (
        "conclusion", "conclusions", "en conclusion", "synthese", "impression", "impressions",
        "opinion", "avis",
    ),
}  # fmt: skip
HEADINGS: dict[str, str] = {h: name for name, hs in _SECTION_HEADINGS.items() for h in hs}
SECTIONS = frozenset(HEADINGS.values())
DEFAULT_SECTIONS: tuple[str, ...] = ("findings", "conclusion")

# A heading: up to 40 letters/spaces/apostrophes at the start of a line, then a colon.
_HEADING = re.compile(r"^[ \t]*([^\W\d_][\w' ]{0,40}?)[ \t]*:", re.MULTILINE)
# Lines that end the last section: the signature block.
_SIGNATURE = re.compile(
    r"^[ \t]*(compte[ -]rendu valid|valid[ée] par|sign[ée] (par|le)|report signed|"
    r"electronically signed|dictated by|signed by)",
    re.IGNORECASE | re.MULTILINE,
)


def _normalise(heading: str) -> str:
    text = unicodedata.normalize("NFKD", heading.strip().lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.replace("’", "'"))


def split_sections(report: str) -> list[tuple[str, str]]:
    """``(section, text)`` in report order; section is a name of ``SECTIONS`` or ``""`` for
    text before the first recognised heading. The text keeps its heading line."""
    starts = [
        (m.start(), HEADINGS[_normalise(m.group(1))])
        for m in _HEADING.finditer(report)
        if _normalise(m.group(1)) in HEADINGS
    ]
    signature = _SIGNATURE.search(report, starts[-1][0] if starts else 0)
    end = signature.start() if signature else len(report)
    out: list[tuple[str, str]] = []
    if not starts or starts[0][0] > 0:
        out.append(("", report[: starts[0][0] if starts else end]))
    for i, (pos, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else end
        out.append((name, report[pos:stop]))
    return out


def select_sections(report: str, sections: Sequence[str] | None = DEFAULT_SECTIONS) -> str:
    """The wanted sections of ``report`` joined in report order, or the whole report when
    ``sections`` is None or the report has none of them."""
    if not sections:
        return report
    unknown = set(sections) - SECTIONS
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    wanted = set(sections)
    parts = [text.strip() for name, text in split_sections(report) if name in wanted]
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if parts else report
