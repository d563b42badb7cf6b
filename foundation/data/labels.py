"""Label tables for biomarker heads, joined to samples by pseudonym.

A table (CSV, or Parquet when pyarrow is importable) has one key column and target columns.
The key column holds either a pseudonym already (``study``, ``accession``, ``patient``: the
values of ``meta["study"]`` etc.) or an original hospital identifier (``accession_number``,
``patient_id``), which is hashed with the pseudonymisation key as the row is read. Raw
identifiers live only in the local variable of the row being read: they are never stored in
the table, written anywhere, or named in an error (errors give the file and the row number).
Only the key and the requested target columns are kept: other identifier columns of the file
(a ``patient_id`` next to an ``accession_number`` key) are dropped on load.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foundation.privacy.pseudonym import PseudonymKey
from foundation.sample import Sample

# key column -> (meta field it joins on, pseudonym namespace to hash with; None: already hashed)
KEY_COLUMNS: dict[str, tuple[str, str | None]] = {
    "study": ("study", None),
    "accession": ("accession", None),
    "patient": ("patient", None),
    "accession_number": ("accession", "accession"),
    "patient_id": ("patient", "patient"),
}
_MISSING = {"", "na", "nan", "null", "none"}
_BOOLEAN = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
# What a target column must hold, by the task that reads it (``load_label_table(kinds=)``):
# "number" (regression), "binary" (0/1, true/false, yes/no), "class" (any value; "none" is a
# class, not a missing cell), "auto" (numbers, booleans, else text: no check).
COLUMN_KINDS = ("number", "binary", "class", "auto")
_DECIMAL_COMMA = re.compile(r"^\s*-?\d+,\d+\s*$")


class LabelTableError(ValueError):
    """A label table that cannot be used; the message names the file and the reason only."""


@dataclass
class LabelTable:
    """Targets by pseudonym: ``rows[pseudonym][column] -> value`` (float, or str for classes)."""

    join_on: str  # "study" | "accession" | "patient": the meta field to look up
    columns: list[str]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    joined: set[str] = field(default_factory=set)  # keys a lookup found (rows that were used)

    def lookup(self, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """The targets of the sample whose meta is given, or None when it has no row."""
        ident = meta.get(self.join_on)
        row = self.rows.get(ident) if ident else None
        if row is not None:
            self.joined.add(ident)  # type: ignore[arg-type]
        return row

    def __len__(self) -> int:
        return len(self.rows)


def _parse(value: Any, kind: str = "auto") -> Any:
    """Numbers as float, booleans as 0/1, missing as NaN, else a stripped string (a class).
    A ``class`` column keeps words as they are: only empty, NA, NaN and null are missing."""
    if value is None:
        return float("nan")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if kind == "class":
        if text.lower() in _MISSING - {"none"}:
            return float("nan")
        try:
            return float(text)
        except ValueError:
            return text
    if text.lower() in _MISSING:
        return float("nan")
    if text.lower() in _BOOLEAN:
        return _BOOLEAN[text.lower()]
    try:
        return float(text)
    except ValueError:
        return text


def _invalid(value: Any, kind: str) -> bool:
    """Whether a parsed cell does not fit its column's kind (missing cells always fit)."""
    if is_missing(value) or kind in ("class", "auto"):
        return False
    if not isinstance(value, float) or not math.isfinite(value):
        return True  # text, or an infinite ratio (x/0) a regression cannot fit
    return kind == "binary" and value not in (0.0, 1.0)


_EXPECTED = {"number": "a finite number", "binary": "0 or 1 (true/false, yes/no)"}


def _parquet_kind(t: Any) -> str:
    """ "text" for a column of strings (plain, large, view, or dictionary-encoded strings), else
    the Arrow type's name."""
    import pyarrow as pa

    value = t.value_type if pa.types.is_dictionary(t) else t
    is_text = (
        pa.types.is_string(value)
        or pa.types.is_large_string(value)
        or getattr(pa.types, "is_string_view", lambda _: False)(value)
    )
    return "text" if is_text else str(t)


def _read_rows(
    path: Path, wanted: list[str]
) -> tuple[list[str], Iterable[dict[str, Any]], int, dict[str, str]]:
    """Header, rows (only the ``wanted`` columns for Parquet), the number of the first data
    row, and each Parquet column's kind ("text" or its Arrow type; empty for CSV)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise LabelTableError(f"{path}: reading Parquet needs pyarrow; use CSV") from err
        schema = pq.read_schema(path)
        header = list(schema.names)
        types = {name: _parquet_kind(schema.field(name).type) for name in header}
        present = [c for c in dict.fromkeys(wanted) if c in header]
        return header, pq.read_table(path, columns=present).to_pylist(), 1, types
    f = path.open(newline="", encoding="utf-8-sig")
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or [])

    def rows() -> Iterable[dict[str, Any]]:
        with f:
            yield from reader

    return header, rows(), 2, {}  # row 1 is the header


def load_label_table(
    path: str | Path,
    key_column: str,
    columns: Iterable[str],
    key: PseudonymKey | None = None,
    *,
    join_on: str | None = None,
    namespace: str | None = None,
    kinds: Mapping[str, str] | None = None,
) -> LabelTable:
    """Read ``path`` keeping ``key_column`` (hashed if raw) and the target ``columns``.

    ``key_column`` is one of ``KEY_COLUMNS`` or, with ``join_on`` (and ``namespace`` when the
    column holds raw identifiers), any column name. Raw identifiers need ``key``. ``kinds``
    (column -> one of ``COLUMN_KINDS``, default "auto") checks every cell as it is read: the
    cells that do not fit are counted and the first one's row named, before any image is read.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"{path}: label table not found")
    if join_on is None:
        if key_column not in KEY_COLUMNS:
            raise LabelTableError(
                f"{path}: key column {key_column!r} is not one of {sorted(KEY_COLUMNS)}; "
                "give join_on (study|accession|patient) for another name"
            )
        join_on, namespace = KEY_COLUMNS[key_column]
    elif namespace is None and key_column in KEY_COLUMNS:
        namespace = KEY_COLUMNS[key_column][1]  # a raw column is hashed whatever join_on says
    if join_on not in ("study", "accession", "patient"):
        raise LabelTableError(f"{path}: join_on must be study, accession or patient")
    if namespace is not None and key is None:
        raise LabelTableError(
            f"{path}: key column {key_column!r} holds raw identifiers; a pseudonymisation key is needed"
        )
    columns = list(columns)
    kinds = {c: (kinds or {}).get(c, "auto") for c in columns}
    header, rows, first_row, types = _read_rows(path, [key_column, *columns])
    missing = [c for c in [key_column, *columns] if c not in header]
    if missing:
        raise LabelTableError(f"{path}: missing columns {missing}")
    key_type = types.get(key_column, "text")  # CSV cells are text
    if key_type == "null":
        raise LabelTableError(f"{path}: key column {key_column!r} holds no value")
    if key_type != "text":
        raise LabelTableError(
            f"{path}: key column {key_column!r} is stored as {key_type}; identifiers must be text "
            "(as a number they lose leading zeros and match no study): write it as strings"
        )

    table = LabelTable(join_on=join_on, columns=columns, source=path.name)
    bad: dict[str, list[int]] = {}  # column -> [count, first row]
    comma: set[str] = set()
    for i, row in enumerate(rows, start=first_row):
        raw = row.get(key_column)
        ident = "" if raw is None else str(raw).strip()
        if not ident:
            raise LabelTableError(f"{path}: row {i} has an empty {key_column!r}")
        if namespace is not None:
            ident = key.pseudonym(namespace, ident)  # type: ignore[union-attr]
        if ident in table.rows:
            raise LabelTableError(f"{path}: row {i} repeats the key of an earlier row")
        values = {c: _parse(row.get(c), kinds[c]) for c in columns}
        for c, v in values.items():
            if _invalid(v, kinds[c]):
                bad.setdefault(c, [0, i])[0] += 1
                if isinstance(v, str) and _DECIMAL_COMMA.match(v):
                    comma.add(c)
        table.rows[ident] = values
    if bad:
        problems = "; ".join(
            f"column {c!r}: {n} cells are not {_EXPECTED[kinds[c]]}, the first in row {first}"
            + (" (a decimal comma? write 0.52, not 0,52)" if c in comma else "")
            for c, (n, first) in bad.items()
        )
        raise LabelTableError(f"{path}: {problems}")
    return table


def is_missing(value: Any) -> bool:
    """True for a NaN target (an empty cell)."""
    return isinstance(value, float) and math.isnan(value)


# ---- joining labels to samples ----------------------------------------------------------------
@dataclass
class LabelledSamples:
    """Series with a label row, of one modality and dims; ``rows`` by study pseudonym."""

    keys: list[str] = field(default_factory=list)  # sample keys, in reading order
    sample_study: list[str] = field(default_factory=list)  # study pseudonym of each sample
    study_patient: dict[str, str] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)  # transformed images, when asked for


def source_samples(
    manifest: str | Path, modality: str | None = None, dims: int | None = None
) -> Iterator[Sample]:
    """Samples of a manifest, reading only the shards that can hold ``modality``/``dims``."""
    from foundation.shards.manifest import Manifest
    from foundation.shards.reader import iter_samples

    m = Manifest.load(manifest)
    m.shards = [
        r
        for r in m.shards
        if (modality is None or not r.modalities or modality in r.modalities)
        and (dims is None or not r.dims or r.dims.get(str(dims), 0) > 0)
    ]
    return iter_samples(m, decode_image=True)


def select_samples(samples: Iterable[Sample], modality: str, dims: int | None) -> Iterator[Sample]:
    """Samples of ``modality`` and ``dims`` (dims fixed by the first match when None)."""
    for s in samples:
        if s.meta.get("modality") != modality:
            continue
        if dims is None:
            dims = int(s.meta["dims"])
        if int(s.meta.get("dims", s.image.ndim)) == dims:
            yield s


def join_labels(
    table: LabelTable,
    samples: Iterable[Sample],
    modality: str,
    dims: int | None,
    transform_for: Callable[[int], Callable[[np.ndarray, dict], Any]] | None = None,
) -> LabelledSamples:
    """Samples of ``modality``/``dims`` that have a label row; images transformed when asked."""
    out = LabelledSamples()
    transform = None
    for s in select_samples(samples, modality, dims):
        row = table.lookup(s.meta)
        if row is None:
            continue
        study = s.meta["study"]
        out.keys.append(s.key)
        out.sample_study.append(study)
        out.study_patient[study] = s.meta["patient"]
        out.rows[study] = row
        if transform_for is not None:
            transform = transform or transform_for(int(s.meta["dims"]))
            out.images.append(transform(s.image, s.meta))
    return out
