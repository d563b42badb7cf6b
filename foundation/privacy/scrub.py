"""Report text scrubbing: identifiers out, clinical content in (French and English reports).

Each detector finds character spans with an eds-pseudo label (NOM, DATE, TEL, ...); spans that
overlap are merged and the merged span is replaced by the placeholder of its strongest label
("[NOM]", "[DATE]", ...), so the report stays readable. Dates are moved by the patient's shift
(the one ``study_date`` gets) when ``shift_days`` is given, birth dates always blanked.

Detectors work by context (titles "Dr", "Mme" and labels "IPP :", "né le" before the value) and
by shape (phones, e-mails, NIR, postal codes), plus the study's own header values (``deny``,
from ``deid.identifier_values``), matched case- and accent-insensitively on word boundaries.
Bare numbers with units, scores, segments and vertebral levels match none of them.
Known limit: a name with no title, label or header entry stays (that is what ``deny`` is for);
a deny-listed name that is also a common word ("Petit") is blanked everywhere in that report.

The patterns and word lists are in ``scrub_patterns``; this module applies them.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from foundation.privacy.scrub_patterns import (
    ADDRESS_RE,
    BIRTH_CONTEXT_RE,
    CITY_CONTEXT_RE,
    CITY_RE,
    DATE_RES,
    HOSPITAL_RE,
    ID_RES,
    MONTHS_EN,
    MONTHS_FR,
    NAME_LABEL_STRONG_RE,
    NAME_LABEL_WEAK_RE,
    NAME_TOKEN,
    NOT_NAMES,
    PLACEHOLDERS,
    PRIORITY,
    SHAPES,
    TITLE_RE,
    WEEKDAYS_FR,
    ZIP_CITY_RE,
    ZIP_LABEL_RE,
)

__all__ = [
    "MONTHS_EN",
    "MONTHS_FR",
    "PLACEHOLDERS",
    "Span",
    "evaluate_scrubber",
    "find_spans",
    "fold",
    "scrub_report",
]


@dataclass(frozen=True)
class Span:
    """A detected identifier: ``text[start:end]`` becomes ``replacement``."""

    start: int
    end: int
    label: str
    replacement: str
    # found only because the study's header holds this value: when a detector that knows
    # what the text is (a date it can shift, a phone number) covers it too, that one wins
    from_deny_list: bool = False


def _name_tokens(text: str, pos: int) -> list[re.Match[str]]:
    """The run of name tokens starting at ``pos`` (same line, at most 4)."""
    tokens: list[re.Match[str]] = []
    while len(tokens) < 4:
        m = NAME_TOKEN.match(text, _skip_blanks(text, tokens[-1].end()) if tokens else pos)
        if not m or m.group().strip(".'’").lower() in NOT_NAMES:
            break
        tokens.append(m)
    return tokens


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _names(text: str) -> Iterator[Span]:
    """Capitalised words after a title ("Dr", "Mme", "Monsieur") or a label ("Patient :")."""
    for regex in (TITLE_RE, NAME_LABEL_STRONG_RE, NAME_LABEL_WEAK_RE):
        for m in regex.finditer(text):
            start = m.end()
            title = TITLE_RE.match(text, start) if regex is not TITLE_RE else None
            start = title.end() if title else start  # "Radiologue : Dr Martin"
            tokens = _name_tokens(text, start)
            weak = regex is NAME_LABEL_WEAK_RE and not title
            if weak and len(tokens) < 2 and not any(t.group().isupper() and len(t.group()) > 1 for t in tokens):  # fmt: skip
                continue
            if tokens:
                yield Span(start, tokens[-1].end(), "NOM", PLACEHOLDERS["NOM"])


def _shapes_and_contexts(text: str) -> Iterator[Span]:
    for label, regex in SHAPES:
        for m in regex.finditer(text):
            yield Span(m.start(), m.end(), label, PLACEHOLDERS[label])
    for label, regex in ID_RES:
        for m in regex.finditer(text):
            yield Span(m.start(1), m.end(1), label, PLACEHOLDERS[label])
    for m in ADDRESS_RE.finditer(text):
        yield Span(m.start(), m.end(), "ADRESSE", PLACEHOLDERS["ADRESSE"])
    for m in ZIP_CITY_RE.finditer(text):
        yield Span(m.start(1), m.end(1), "ZIP", PLACEHOLDERS["ZIP"])
        yield Span(m.start(2), m.end(2), "VILLE", PLACEHOLDERS["VILLE"])
    for m in ZIP_LABEL_RE.finditer(text):
        yield Span(m.start(1), m.end(1), "ZIP", PLACEHOLDERS["ZIP"])
    for regex in (CITY_CONTEXT_RE, CITY_RE):
        for m in regex.finditer(text):
            g = 1 if regex.groups else 0
            if m.group(g).lower() not in NOT_NAMES:
                yield Span(m.start(g), m.end(g), "VILLE", PLACEHOLDERS["VILLE"])
    for m in HOSPITAL_RE.finditer(text):
        yield Span(m.start(), m.end(), "HOPITAL", PLACEHOLDERS["HOPITAL"])


# ---------------------------------------------------------------------------------------------
# Dates: moved by the patient's shift (same format), or blanked; birth dates always blanked
# ---------------------------------------------------------------------------------------------


def _month_number(name: str) -> int:
    key = fold(name)[0].rstrip(".")[:3]
    fr = [fold(m)[0][:3] for m in MONTHS_FR]
    en = [m.lower()[:3] for m in MONTHS_EN]
    if key == "jui":  # juin / juillet share three letters
        return 7 if fold(name)[0].startswith("juil") else 6
    return (fr.index(key) if key in fr else en.index(key)) + 1


def _year(text: str) -> int:
    y = int(text)
    if len(text) == 2:  # 2-digit years: the past century unless it would be in the future
        y += 2000 if y <= dt.date.today().year % 100 else 1900
    return y


def _shifted(kind: str, m: re.Match[str], days: int) -> str | None:
    """The date of ``m`` moved by ``days``, written like the original; None if not a date."""
    g = m.groupdict()
    try:
        month = _month_number(g["mon"]) if g.get("mon") else int(g["m"])
        day = g.get("d")
        if day is None:  # month and year only: move the middle of the month
            new = dt.date(_year(g["y"]), month, 15) + dt.timedelta(days=days)
        else:
            base_year = _year(g["y"]) if g.get("y") else 2000  # leap year: "29 février" stays valid
            new = dt.date(base_year, month, 1 if day == "1er" else int(day)) + dt.timedelta(
                days=days
            )
    except (ValueError, TypeError):
        return None
    if kind == "num":  # same order, separator and zero-padding as the original
        keys = sorted((k for k in ("d", "m", "y") if g.get(k)), key=m.start)
        parts = {"d": new.day, "m": new.month, "y": new.year}
        out = []
        for k in keys:
            if k == "y":
                out.append(f"{new.year % 100:02d}" if len(g["y"]) == 2 else str(new.year))
            else:
                out.append(f"{parts[k]:02d}" if len(g[k]) == 2 else str(parts[k]))
        return (g.get("sep") or "").join(out)
    months = MONTHS_FR if kind == "fr" else MONTHS_EN
    month_name = months[new.month - 1]
    if g["mon"][:1].isupper():
        month_name = month_name[:1].upper() + month_name[1:]
    if day is None:
        return f"{month_name} {new.year}"
    d = "1er" if kind == "fr" and new.day == 1 else str(new.day)
    year = f" {new.year}" if g.get("y") else ""
    if kind == "en" and m.group().lstrip()[:1].isalpha():
        return f"{month_name} {d},{year}".rstrip(",") if year else f"{month_name} {d}"
    weekday = ""
    if g.get("wd"):
        weekday = WEEKDAYS_FR[new.weekday()]
        weekday = (weekday.capitalize() if g["wd"][:1].isupper() else weekday) + " "
    return f"{weekday}{d} {month_name}{year}"


def _date_like(m: re.Match[str]) -> bool:
    g = m.groupdict()
    return int(g.get("d") or 1) <= 31 and int(g["m"]) <= 12


def _dates(text: str, shift_days: int | None) -> Iterator[Span]:
    for kind, regex in DATE_RES:
        for m in regex.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            before = text[max(line_start, m.start() - 40) : m.start()]
            if BIRTH_CONTEXT_RE.search(before):
                yield Span(m.start(), m.end(), "DATE_NAISSANCE", PLACEHOLDERS["DATE_NAISSANCE"])
                continue
            if kind == "num" and _shifted(kind, m, 0) is None and not _date_like(m):
                continue  # "45/13/20" and such: not a date at all ("31/02/2024" still is)
            new = _shifted(kind, m, shift_days) if shift_days is not None else None
            yield Span(m.start(), m.end(), "DATE", new or PLACEHOLDERS["DATE"])


# ---------------------------------------------------------------------------------------------
# Deny-list: the study's own header values, case- and accent-insensitive
# ---------------------------------------------------------------------------------------------


def fold(text: str) -> tuple[str, list[int]]:
    """Lower-cased, accent-free ``text`` and, per folded character, its index in ``text``."""
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        base = base.lower().replace("’", "'") or ch
        out.append(base)
        index.extend([i] * len(base))
    return "".join(out), index


def _deny_spans(text: str, deny: Iterable[str]) -> Iterator[Span]:
    patterns = []
    for value in {str(v) for v in deny if v is not None}:
        tokens = re.findall(r"\w+", fold(value)[0])
        if not tokens or sum(len(t) for t in tokens) < 2:
            continue
        patterns.append(r"[\W_]{1,3}".join(map(re.escape, tokens)))
    if not patterns:
        return
    patterns.sort(key=len, reverse=True)  # longest first: "Jean Dupont" before "Jean"
    regex = re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)")
    folded, index = fold(text)
    for m in regex.finditer(folded):
        start, end = index[m.start()], index[m.end() - 1] + 1
        label = "IPP" if any(c.isdigit() for c in m.group()) else "NOM"
        yield Span(start, end, label, PLACEHOLDERS[label], from_deny_list=True)


# ---------------------------------------------------------------------------------------------
# Merge and replace
# ---------------------------------------------------------------------------------------------


def _merge(spans: Iterable[Span]) -> list[Span]:
    """Overlapping spans -> one span over their union, labelled by the strongest label."""
    rank = {label: i for i, label in enumerate(PRIORITY)}
    merged: list[Span] = []
    cluster: list[Span] = []

    def close() -> None:
        if not cluster:
            return
        start, end = min(s.start for s in cluster), max(s.end for s in cluster)
        best = min(
            cluster,
            key=lambda s: (s.from_deny_list, rank.get(s.label, len(rank)), -(s.end - s.start)),
        )
        exact = best.start == start and best.end == end
        merged.append(Span(start, end, best.label, best.replacement if exact else PLACEHOLDERS[best.label]))  # fmt: skip
        cluster.clear()

    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if cluster and span.start >= max(s.end for s in cluster):
            close()
        cluster.append(span)
    close()
    return merged


def find_spans(text: str, deny: Iterable[str] = (), shift_days: int | None = None) -> list[Span]:
    """Identifier spans of ``text``, merged, sorted and non-overlapping."""
    spans = [
        *_dates(text, shift_days),
        *_shapes_and_contexts(text),
        *_names(text),
        *_deny_spans(text, deny),
    ]
    return _merge(spans)


def scrub_report(text: str, deny: Iterable[str] = (), shift_days: int | None = None) -> str:
    """``text`` with names, dates, contacts, addresses and identifiers replaced by placeholders.

    ``deny``: the study's identifying header values (``deid.identifier_values``), removed
    wherever they occur. ``shift_days``: the patient's date shift; dates are moved by it and
    written in their original format, or become "[DATE]" when it is None.
    """
    return _apply(text, find_spans(text, deny, shift_days))


def _apply(text: str, spans: list[Span]) -> str:
    out: list[str] = []
    pos = 0
    for span in spans:  # sorted, disjoint
        out += [text[pos : span.start], span.replacement]
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


def _occurrences(needle: str, haystack: str) -> list[tuple[int, int]]:
    if not needle.strip():
        return []
    regex = re.compile(r"(?<!\w)" + re.escape(needle.strip()) + r"(?!\w)", re.IGNORECASE)
    return [(m.start(), m.end()) for m in regex.finditer(haystack)]


def _covered(start: int, end: int, spans: list[Span]) -> bool:
    """Every character of ``[start, end)`` lies in a detected span (spans are disjoint)."""
    covered = sum(max(0, min(end, s.end) - max(start, s.start)) for s in spans)
    return covered >= end - start


def evaluate_scrubber(
    reports: Mapping[str, str],
    planted: Mapping[str, list[dict]],
    deny: Mapping[str, Iterable[str]] | None = None,
    shift_days: Mapping[str, int] | None = None,
) -> dict:
    """Recall and precision of ``scrub_report`` against planted identifiers, per label.

    ``planted[report_id]``: ``[{"text": ..., "label": ...}]`` (optional "start"/"end").
    Recall: share of planted spans whose text no longer appears in the output. Precision:
    share of replaced spans that overlap a planted span. Returns counts per label, overall
    figures and the (report id, label) of every leak; never the identifier texts.
    """
    deny, shift_days = deny or {}, shift_days or {}
    per_label: dict[str, dict[str, float]] = {}
    leaks: list[tuple[str, str]] = []

    def row(label: str) -> dict[str, float]:
        return per_label.setdefault(label, {"planted": 0, "removed": 0, "predicted": 0, "hits": 0})

    for rid, text in reports.items():
        spans = find_spans(text, deny.get(rid, ()), shift_days.get(rid))
        scrubbed = _apply(text, spans)
        intervals: list[tuple[int, int]] = []
        for item in planted.get(rid, []):
            label, ptext = str(item["label"]), str(item["text"])
            row(label)["planted"] += 1
            if "start" in item and "end" in item:
                # judged by position: a shifted date may, by chance, read like another planted
                # date of the same report; what matters is whether this span was replaced
                ps, pe = int(item["start"]), int(item["end"])
                intervals.append((ps, pe))
                leaked = not _covered(ps, pe, spans)
            else:
                intervals.extend(_occurrences(ptext, text))
                leaked = bool(_occurrences(ptext, scrubbed))
            if leaked:
                leaks.append((rid, label))
            else:
                row(label)["removed"] += 1
        for span in spans:
            r = row(span.label)
            r["predicted"] += 1
            r["hits"] += any(span.start < e and s < span.end for s, e in intervals)
    for r in per_label.values():
        r["recall"] = r["removed"] / r["planted"] if r["planted"] else None
        r["precision"] = r["hits"] / r["predicted"] if r["predicted"] else None
    tot = {k: sum(r[k] for r in per_label.values()) for k in ("planted", "removed", "predicted", "hits")}  # fmt: skip
    return {
        "reports": len(reports),
        "per_label": per_label,
        "recall": tot["removed"] / tot["planted"] if tot["planted"] else None,
        "precision": tot["hits"] / tot["predicted"] if tot["predicted"] else None,
        "leaks": leaks,
    }
