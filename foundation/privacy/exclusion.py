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

import contextlib
import csv
import datetime as dt
import hashlib
import itertools
import json
import operator
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _encode_str  # what json.dumps uses
from pathlib import Path
from typing import Any

from foundation.atomic import write_json_atomic
from foundation.privacy.exclusion_cache import Rows, read_sidecar, write_sidecar
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


def _rows_from_json(entries: list[dict[str, str]]) -> Rows:
    """The JSON's entries -> sorted unique columns; the first entry of a (pseudonym, type) pair
    wins, as in ``ExclusionList(entries)``. ``KeyError``/``TypeError`` on a malformed entry."""
    if entries and set(map(len, entries)) != {3}:
        raise TypeError("an entry has other fields than pseudonym, request_type, date_received")
    ps = [e["pseudonym"] for e in entries]
    ts = [e["request_type"] for e in entries]
    ds = [e["date_received"] for e in entries]
    keys = list(zip(ps, ts, strict=True))
    if all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
        return Rows(ps, ts, ds)  # as save() writes it: sorted, unique
    unique = dict(zip(reversed(keys), reversed(ds), strict=True))  # the first one wins
    items = sorted(unique.items())
    return Rows([k[0] for k, _ in items], [k[1] for k, _ in items], [d for _, d in items])


class ExclusionList:
    """Versioned set of excluded patient pseudonyms, with request type and date.

    A loaded list keeps its content as sorted columns (``Rows``) and builds entry objects only
    when asked (``entries``, imports): the stream needs the pseudonyms and the version alone.
    """

    def __init__(self, entries: Iterable[ExclusionEntry] = (), key_id: str | None = None) -> None:
        self._dict: dict[tuple[str, str], ExclusionEntry] | None = {}
        self._rows: Rows | None = None  # the content while _dict is None (a loaded list)
        self._key_id = key_id
        self._memo: dict[str, Any] = {}  # version, pseudonyms: derived, dropped on change
        for e in entries:
            if e.request_type not in REQUEST_TYPES:
                raise ExclusionError(f"unknown request type {e.request_type!r}")
            self._dict.setdefault((e.pseudonym, e.request_type), e)

    @classmethod
    def _from_rows(cls, rows: Rows, key_id: str | None, version: str | None) -> ExclusionList:
        out = cls(key_id=key_id)
        out._dict, out._rows = None, rows
        if version is not None:
            out._memo["version"] = version
        return out

    @property
    def key_id(self) -> str | None:
        """Fingerprint of the pseudonymisation key the pseudonyms were made with."""
        return self._key_id

    @key_id.setter
    def key_id(self, value: str | None) -> None:
        self._key_id = value
        self._memo.clear()  # the version covers the key id

    @property
    def _entries(self) -> dict[tuple[str, str], ExclusionEntry]:
        """(pseudonym, request type) -> entry, built from loaded rows on first use. Callers
        that change it call ``_changed``."""
        if self._dict is None:
            assert self._rows is not None
            self._dict = {
                (p, t): ExclusionEntry(p, t, d) for p, t, d in zip(*self._rows, strict=True)
            }
            self._rows = None
        return self._dict

    def _changed(self) -> None:
        self._memo.clear()

    def _content(self) -> Rows:
        """The content as sorted columns."""
        if self._dict is None:
            assert self._rows is not None
            return self._rows
        entries = self.entries
        return Rows(
            [e.pseudonym for e in entries],
            [e.request_type for e in entries],
            [e.date_received for e in entries],
        )

    # -- content ---------------------------------------------------------------------------

    @property
    def entries(self) -> list[ExclusionEntry]:
        """All requests, sorted (pseudonym, request type)."""
        if self._dict is None:
            assert self._rows is not None
            return [ExclusionEntry(*r) for r in zip(*self._rows, strict=True)]  # already sorted
        return sorted(self._dict.values())

    @property
    def pseudonyms(self) -> frozenset[str]:
        """Every excluded patient, whatever the request type."""
        if "pseudonyms" not in self._memo:
            keys = self._rows.pseudonyms if self._dict is None else (p for p, _ in self._dict)  # type: ignore[union-attr]
            self._memo["pseudonyms"] = frozenset(keys)
        return self._memo["pseudonyms"]

    def among(self, patients: Set[str]) -> frozenset[str]:
        """The excluded patients among ``patients`` (a dataset's): for a loaded list, one pass
        over its sorted column, without building the set of the whole list (the stream calls
        this at each epoch start: 1M pseudonyms hash into a set in a quarter of a second)."""
        if self._dict is None and "pseudonyms" not in self._memo:
            assert self._rows is not None
            return frozenset(patients).intersection(self._rows.pseudonyms)
        return frozenset(patients).intersection(self.pseudonyms)

    def pseudonyms_for(self, request_type: str) -> frozenset[str]:
        """Patients with a request of ``request_type`` ("erasure": shards to rewrite)."""
        rows = self._content()
        return frozenset(
            p for p, t in zip(rows.pseudonyms, rows.types, strict=True) if t == request_type
        )

    @property
    def counts(self) -> dict[str, int]:
        """Number of requests per type (every type present, zeros included)."""
        c = Counter(self._content().types)
        return {t: c.get(t, 0) for t in REQUEST_TYPES}

    def __contains__(self, pseudonym: object) -> bool:
        return pseudonym in self.pseudonyms

    def __len__(self) -> int:
        return len(self.pseudonyms)

    def __iter__(self) -> Iterator[ExclusionEntry]:
        return iter(self.entries)

    def _canonical(self) -> bytes:
        """``json.dumps({"key_id", "entries"}, sort_keys=True, separators=(",", ":"))`` of the
        sorted entries, written out directly (json.dumps of 1M dicts takes seconds; the
        string encoder is the one json.dumps uses, so the bytes are the same)."""
        rows, enc = self._content(), _encode_str
        body = ",".join(
            [
                f'{{"date_received":{enc(d)},"pseudonym":{enc(p)},"request_type":{enc(t)}}}'
                for p, t, d in zip(*rows, strict=True)
            ]
        )
        return f'{{"entries":[{body}],"key_id":{json.dumps(self.key_id)}}}'.encode()

    @property
    def version(self) -> str:
        """Short SHA-256 of the canonical content: same content, same version."""
        if "version" not in self._memo:
            self._memo["version"] = hashlib.sha256(self._canonical()).hexdigest()[:16]
        return self._memo["version"]

    def __repr__(self) -> str:
        return f"ExclusionList(version={self.version}, counts={self.counts})"

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, missing_ok: bool = False, cache: bool = True
    ) -> ExclusionList:
        """Read a list written by ``save``; an absent file is an empty list if ``missing_ok``.

        With ``cache``, a valid binary sidecar (``exclusion_cache``) is read instead of the
        JSON, and one is written after the JSON was read and verified."""
        path = Path(path)
        if missing_ok and not path.exists():
            return cls()
        if cache and (hit := read_sidecar(path)) is not None:
            return cls._from_rows(*hit)
        try:
            with open(path, "rb") as f:  # the stamp and the bytes of one file state
                st = os.fstat(f.fileno())
                data = json.loads(f.read().decode("utf-8"))
            if data.get("format") != FORMAT:
                raise ExclusionError(f"{path}: not an exclusion list")
            key_id = data.get("key_id")
            rows = _rows_from_json(data["entries"])
            bad = set(rows.types) - set(REQUEST_TYPES)
            if bad:
                raise ExclusionError(f"unknown request type {sorted(bad)[0]!r}")
            out = cls._from_rows(rows, key_id, None)
            version = out.version
        except ExclusionError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExclusionError(
                f"{path}: cannot read exclusion list ({type(exc).__name__})"
            ) from None
        if data.get("version") != version:
            raise ExclusionError(f"{path}: content does not match its recorded version (edited?)")
        if cache:
            write_sidecar(path, rows, key_id, version, st)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then ``os.replace``), and the
        binary sidecar that makes the next ``load`` fast."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self._content()
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "key_id": self.key_id,
            "counts": self.counts,
            "entries": [
                {"pseudonym": p, "request_type": t, "date_received": d}
                for p, t, d in zip(*rows, strict=True)
            ],
        }
        write_json_atomic(path, data)
        # another writer replacing the file meanwhile leaves a sidecar whose version differs
        # from the JSON's: ignored at load
        with contextlib.suppress(OSError):
            write_sidecar(path, rows, self.key_id, self.version, os.stat(path))

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
            self._changed()
            report.added += 1
