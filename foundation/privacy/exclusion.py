"""The exclusion list: patients who objected (GDPR art. 21) or asked for erasure (art. 17).

It holds pseudonyms only, each with its request type and the date the request was received;
raw patient IDs from the requests CSV are hashed with the pseudonymisation key on import and
never stored, printed or put in an error message. The list is versioned by the SHA-256 of its
canonical content, so a manifest or a checkpoint can record exactly which list it honoured, and
it records the fingerprint of the key its pseudonyms were made with (another key is refused).

``stream`` filters samples with ``pseudonym in exclusion_list`` (effective at once); ``shards``
rewrites the shards that hold the ``pseudonyms_for("erasure")``.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from foundation.atomic import write_json_atomic
from foundation.privacy.pseudonym import PseudonymKey

REQUEST_TYPES = ("opposition", "erasure")
# What the requests CSV may say, lower-cased -> request type.
_TYPE_ALIASES = {
    "opposition": "opposition", "opt-out": "opposition", "optout": "opposition",
    "objection": "opposition", "art21": "opposition", "art. 21": "opposition",
    "erasure": "erasure", "effacement": "erasure", "suppression": "erasure",
    "deletion": "erasure", "art17": "erasure", "art. 17": "erasure",
}  # fmt: skip
FORMAT = "foundation-exclusion-list"
FORMAT_VERSION = 1


class ExclusionError(ValueError):
    """The exclusion list or a requests file cannot be used (names the file and the reason)."""


@dataclass(frozen=True, order=True)
class ExclusionEntry:
    """One request: a patient pseudonym, what they asked for and when we received it."""

    pseudonym: str
    request_type: str  # "opposition" | "erasure"
    date_received: str  # ISO date


@dataclass
class ImportReport:
    """What one import did. ``bad_rows``: (CSV line number, reason); never an ID."""

    rows: int = 0
    added: int = 0
    already_present: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.rows} rows: {self.added} added, {self.already_present} already present, "
            f"{len(self.bad_rows)} rejected"
        )


def _parse_date(text: str) -> dt.date | None:
    text = text.strip()
    for fmt in ("%Y-%m-%d", "%d/%m/%Y", "%Y%m%d", "%d.%m.%Y"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


class ExclusionList:
    """Versioned set of excluded patient pseudonyms, with request type and date."""

    def __init__(self, entries: Iterable[ExclusionEntry] = (), key_id: str | None = None) -> None:
        self._entries: dict[tuple[str, str], ExclusionEntry] = {}
        self.key_id = key_id
        for e in entries:
            if e.request_type not in REQUEST_TYPES:
                raise ExclusionError(f"unknown request type {e.request_type!r}")
            self._entries.setdefault((e.pseudonym, e.request_type), e)

    # -- content ---------------------------------------------------------------------------

    @property
    def entries(self) -> list[ExclusionEntry]:
        """All requests, sorted (pseudonym, request type)."""
        return sorted(self._entries.values())

    @property
    def pseudonyms(self) -> frozenset[str]:
        """Every excluded patient, whatever the request type."""
        return frozenset(p for p, _ in self._entries)

    def pseudonyms_for(self, request_type: str) -> frozenset[str]:
        """Patients with a request of ``request_type`` ("erasure": shards to rewrite)."""
        return frozenset(p for p, t in self._entries if t == request_type)

    @property
    def counts(self) -> dict[str, int]:
        """Number of requests per type (every type present, zeros included)."""
        c = Counter(t for _, t in self._entries)
        return {t: c.get(t, 0) for t in REQUEST_TYPES}

    def __contains__(self, pseudonym: object) -> bool:
        return pseudonym in self.pseudonyms

    def __len__(self) -> int:
        return len(self.pseudonyms)

    def __iter__(self) -> Iterator[ExclusionEntry]:
        return iter(self.entries)

    def _canonical(self) -> bytes:
        body = {"key_id": self.key_id, "entries": [e.__dict__ for e in self.entries]}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def version(self) -> str:
        """Short SHA-256 of the canonical content: same content, same version."""
        return hashlib.sha256(self._canonical()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ExclusionList(version={self.version}, counts={self.counts})"

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, missing_ok: bool = False) -> ExclusionList:
        """Read a list written by ``save``; an absent file is an empty list if ``missing_ok``."""
        path = Path(path)
        if missing_ok and not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ExclusionError(f"{path}: not an exclusion list")
            entries = [ExclusionEntry(**e) for e in data["entries"]]
            out = cls(entries, key_id=data.get("key_id"))
        except ExclusionError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExclusionError(
                f"{path}: cannot read exclusion list ({type(exc).__name__})"
            ) from None
        if data.get("version") != out.version:
            raise ExclusionError(f"{path}: content does not match its recorded version (edited?)")
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "key_id": self.key_id,
            "counts": self.counts,
            "entries": [e.__dict__ for e in self.entries],
        }
        write_json_atomic(path, data)

    # -- requests --------------------------------------------------------------------------

    def import_requests(
        self,
        csv_path: str | os.PathLike,
        key: PseudonymKey,
        *,
        id_column: str = "patient_id",
        type_column: str = "request_type",
        date_column: str = "date_received",
    ) -> ImportReport:
        """Add the requests of a CSV (raw patient IDs, hashed here). Idempotent.

        A request already present (same patient, same type) is not added again, so re-importing
        a file changes nothing. Bad rows are reported by line number and reason and skipped.
        """
        csv_path = Path(csv_path)
        if self.key_id is not None and self.key_id != key.key_id:
            raise ExclusionError(
                f"{csv_path}: the exclusion list was built with another pseudonymisation key"
            )
        report = ImportReport()
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as f:
                sample = f.read(4096)
                f.seek(0)
                try:
                    dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
                except csv.Error:
                    dialect = csv.excel
                reader = csv.DictReader(f, dialect=dialect)
                missing = {id_column, type_column, date_column} - set(reader.fieldnames or ())
                if missing:
                    raise ExclusionError(f"{csv_path}: missing columns {sorted(missing)}")
                self.key_id = key.key_id
                for row in reader:
                    report.rows += 1
                    self._import_row(row, reader.line_num, key, report, (id_column, type_column, date_column))  # fmt: skip
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ExclusionError(
                f"{csv_path}: cannot read requests ({type(exc).__name__})"
            ) from None
        return report

    def _import_row(
        self,
        row: dict[str, str | None],
        line: int,
        key: PseudonymKey,
        report: ImportReport,
        columns: tuple[str, str, str],
    ) -> None:
        raw_id, raw_type, raw_date = ((row.get(c) or "").strip() for c in columns)
        request_type = _TYPE_ALIASES.get(raw_type.lower())
        date = _parse_date(raw_date)
        reason = (
            "empty patient id" if not raw_id
            else "unknown request type" if request_type is None
            else "bad or missing date" if date is None
            else "date in the future" if date > dt.date.today()
            else None
        )  # fmt: skip
        if reason is not None:
            report.bad_rows.append((line, reason))
            return
        entry = ExclusionEntry(key.patient(raw_id), request_type, date.isoformat())
        k = (entry.pseudonym, entry.request_type)
        if k in self._entries:
            report.already_present += 1
        else:
            self._entries[k] = entry
            report.added += 1
