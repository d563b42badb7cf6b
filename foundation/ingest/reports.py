"""The report table of an export: report text by accession number, read once from a CSV.

Reports stay raw (unscrubbed) in memory only; each is scrubbed with its own study's headers
as a deny-list before anything is written. Rows without an identifier or with an empty text are
counted, never silently merged; a study whose accession is absent is ingested without a report.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path


class ReportTableError(ValueError):
    """The report CSV cannot be used (missing columns, not UTF-8)."""


@dataclass
class ReportTable:
    """Raw report texts keyed by accession number (or another configured column)."""

    texts: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    empty_rows: int = 0
    duplicate_ids: int = 0

    @classmethod
    def from_csv(
        cls,
        path: Path | None,
        *,
        id_column: str = "accession_number",
        text_column: str = "report",
    ) -> ReportTable:
        """Read ``path`` (UTF-8, with or without BOM); ``None`` gives an empty table."""
        table = cls()
        if path is None:
            return table
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # reports can be long
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                missing = {id_column, text_column} - set(reader.fieldnames or ())
                if missing:
                    raise ReportTableError(
                        f"{path}: missing column(s) {sorted(missing)}; found "
                        f"{reader.fieldnames} (set the column names with --report-id-column/"
                        "--report-text-column)"
                    )
                for row in reader:
                    table.rows += 1
                    ident = (row.get(id_column) or "").strip()
                    text = (row.get(text_column) or "").strip()
                    if not ident or not text:
                        table.empty_rows += 1
                        continue
                    if ident in table.texts:
                        # two reports for one exam (addendum): keep both, in file order
                        table.duplicate_ids += 1
                        table.texts[ident] += "\n\n" + text
                    else:
                        table.texts[ident] = text
        except UnicodeDecodeError as err:
            raise ReportTableError(f"{path}: not UTF-8 (byte {err.start})") from None
        return table

    def get(self, accession: str | None) -> str | None:
        """The raw report of an accession number, or None."""
        if not accession:
            return None
        return self.texts.get(str(accession).strip())
