"""A hash-chained audit log of governance actions (JSON lines, append only).

Each entry holds the SHA-256 of the previous line (``prev``) and of its own canonical content
(``hash``), so editing, inserting or deleting a line anywhere but at the very end breaks the
chain, and editing the last line breaks its own hash. (Truncating the tail cannot be seen from
the file alone: keep a copy of the last hash elsewhere, e.g. in the ticket of the request.)

Entries say what was done, when, by whom (``$USER``), with counts and versions; never a raw
identifier nor a pseudonym (callers pass counts and the exclusion-list version).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_NAME = "audit.jsonl"
LOG_ENV = "FOUNDATION_AUDIT_LOG"
GENESIS = "0" * 64
# Entry fields that must never be written (raw identifiers or pseudonyms of people).
FORBIDDEN_FIELDS = frozenset({"patient_id", "patient", "patients", "pseudonym", "pseudonyms"})


class AuditError(ValueError):
    """The audit log cannot be read or an entry is not acceptable (names the file/reason)."""


def default_log_path(near: str | Path | None = None) -> Path:
    """``$FOUNDATION_AUDIT_LOG``, else ``audit.jsonl`` in the folder of ``near`` (a manifest or
    an exclusion list), else in the current folder."""
    env = os.environ.get(LOG_ENV, "").strip()
    if env:
        return Path(env)
    if near is None:
        return Path(LOG_NAME)
    return Path(near).resolve().parent / LOG_NAME


def _actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode("utf-8")).hexdigest()


def append(log: str | Path, action: str, **fields: Any) -> dict[str, Any]:
    """Append one entry ``{seq, time, actor, action, **fields, prev, hash}``; returns it.

    Concurrent appenders are serialised with an exclusive ``flock`` on the log file.
    """
    bad = FORBIDDEN_FIELDS & set(fields)
    if bad:
        raise AuditError(f"audit entries may not hold {sorted(bad)} (counts only)")
    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0)
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
            prev = _line_hash(lines[-1]) if lines else GENESIS
            entry: dict[str, Any] = {
                "seq": len(lines),
                "time": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                "actor": _actor(),
                "action": action,
                **fields,
                "prev": prev,
            }
            entry["hash"] = _entry_hash(entry)
            f.seek(0, os.SEEK_END)
            f.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return entry


def read(log: str | Path) -> list[dict[str, Any]]:
    """Every entry (no chain check); an absent log is empty."""
    path = Path(log)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AuditError(f"{path}: line {n} is not JSON") from None
    return out


def has_operation(log: str | Path, op_id: str) -> bool:
    """Whether an entry with this ``op_id`` was already appended (resumed operations)."""
    return any(e.get("op_id") == op_id for e in read(log))


@dataclass
class ChainReport:
    log: str
    entries: int = 0
    problems: list[str] = field(default_factory=list)  # "line N: reason"

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.log}: {self.entries} entries, " + (
            "chain intact" if self.ok else f"{len(self.problems)} problems"
        )
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def verify(log: str | Path) -> ChainReport:
    """Check every entry's own hash, its link to the previous line and its sequence number."""
    path = Path(log)
    report = ChainReport(str(path))
    if not path.exists():
        report.problems.append("log not found")
        return report
    prev = GENESIS
    seq = 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        report.entries += 1
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            report.problems.append(f"line {n}: not JSON")
            prev, seq = _line_hash(line), seq + 1
            continue
        if entry.get("prev") != prev:
            report.problems.append(f"line {n}: does not chain to the previous line")
        if entry.get("hash") != _entry_hash(entry):
            report.problems.append(f"line {n}: content differs from its hash (edited)")
        if entry.get("seq") != seq:
            report.problems.append(f"line {n}: sequence {entry.get('seq')}, expected {seq}")
        prev, seq = _line_hash(line), seq + 1
    return report


def save_and_record(
    manifest, path: str | Path, action: str, audit_log: str | Path | None = None, **fields: Any
) -> dict[str, Any]:
    """Save a changed manifest, then append ``action`` with its dataset and version."""
    manifest.save(path)
    return append(
        audit_log or default_log_path(path),
        action,
        dataset=manifest.dataset,
        version=manifest.version,
        **fields,
    )
