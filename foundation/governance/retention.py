"""Retention: each dataset has a deadline; past it, its shards are deleted.

``extra["retention"] = {"last_publication", "period_days" (730 by default), "deadline"}``:
the data may be kept ``period_days`` after the last publication that used it. ``check`` lists
datasets past or near their deadline; ``purge`` (with ``yes=True``) first marks the manifest
purged and empties its patient lists (so nothing trains on it any more, even if the deletion is
interrupted), then deletes the shards, and does the same to the archived versions and merged
parts sharing those shards. Re-running a purge finishes an interrupted one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from foundation.governance import audit, redact
from foundation.governance.dataset_lock import dataset_lock
from foundation.governance.erase import check_not_revoked
from foundation.shards.manifest import Manifest

DEFAULT_PERIOD_DAYS = 730
DEFAULT_WARN_DAYS = 90


def set_retention(
    manifest_path: str | Path,
    last_publication: dt.date,
    period_days: int = DEFAULT_PERIOD_DAYS,
    *,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> dict[str, str | int]:
    """Record the retention deadline in the current manifest; returns the record."""
    if period_days < 0:
        raise ValueError("period_days must be >= 0")
    deadline = last_publication + dt.timedelta(days=period_days)
    record = {
        "last_publication": last_publication.isoformat(),
        "period_days": period_days,
        "deadline": deadline.isoformat(),
    }
    path = Path(manifest_path)
    with dataset_lock(path, wait=lock_wait, operation="retention set"):
        manifest = Manifest.load(path)
        check_not_revoked(manifest)
        manifest.extra["retention"] = record
        audit.save_and_record(manifest, path, "retention set", audit_log, **record)
    return record


@dataclass
class RetentionStatus:
    manifest: str
    dataset: str
    version: int
    deadline: str | None
    days_left: int | None  # negative: past
    state: str  # "unset" | "ok" | "near" | "past" | "purged"


def status(
    manifest: Manifest, today: dt.date | None = None, warn_days: int = DEFAULT_WARN_DAYS
) -> RetentionStatus:
    today = today or dt.date.today()
    ret = manifest.extra.get("retention") or {}
    deadline = ret.get("deadline")
    days = None if deadline is None else (dt.date.fromisoformat(deadline) - today).days
    state = (
        "purged"
        if ret.get("purged")
        else "unset"
        if days is None
        else "past"
        if days < 0
        else "near"
        if days <= warn_days
        else "ok"
    )
    return RetentionStatus(
        str(manifest.location), manifest.dataset, manifest.version, deadline, days, state
    )


def check(
    paths: list[str | Path], today: dt.date | None = None, warn_days: int = DEFAULT_WARN_DAYS
) -> list[RetentionStatus]:
    """Retention state of the manifests given or found in the folders given (current versions
    only: archived versions and merged parts follow their current manifest)."""
    out = []
    for p in map(Path, paths):
        found = redact.iter_manifests(p) if p.is_dir() else [(p, Manifest.load(p))]
        for _, m in found:
            if p.is_dir() and (m.revoked_by is not None or m.extra.get("merged_into")):
                continue
            out.append(status(m, today, warn_days))
    return out


@dataclass
class PurgeResult:
    dataset: str
    version: int
    shards: int  # shard files deleted (or to delete, on a dry run)
    bytes: int
    dry_run: bool


def _mark_purged(m: Manifest, today: dt.date) -> None:
    m.extra.setdefault("retention", {})["purged"] = today.isoformat()
    for rec in m.shards:  # the data is gone: so are the lists of who it was about
        rec.patients, rec.keys = {}, None


def purge(
    manifest_path: str | Path,
    *,
    today: dt.date | None = None,
    yes: bool = False,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> PurgeResult:
    """Delete the shards of a dataset past its deadline (dry run unless ``yes``; only a real
    purge takes the dataset's lock)."""
    path = Path(manifest_path)
    lock = dataset_lock(path, wait=lock_wait, operation="retention purge")
    with lock if yes else contextlib.nullcontext():
        return _purge(path, today or dt.date.today(), yes, audit_log)


def _purge(path: Path, today: dt.date, yes: bool, audit_log: str | Path | None) -> PurgeResult:
    manifest = Manifest.load(path)
    st = status(manifest, today)
    if st.state not in ("past", "purged"):
        raise ValueError(f"{path}: retention deadline not passed (state {st.state}); not purging")
    shards = [p for p in manifest.shard_paths() if p.exists()]
    size = sum(p.stat().st_size for p in shards)
    result = PurgeResult(manifest.dataset, manifest.version, len(shards), size, not yes)
    if not yes:
        return result
    targets = redact.shard_files(manifest)
    if st.state != "purged":  # ledgers first: marking purged forgets who the data was about
        keys = frozenset(k for rec in manifest.shards for k in rec.keys or ())
        redact.redact_ledgers({p.parent.parent for p in targets}, manifest.patients(), keys)
        _mark_purged(manifest, today)
        manifest.save(path)
    for shard in shards:
        shard.unlink(missing_ok=True)
    for folder in redact.related_folders(manifest, path):  # archived versions, merged parts
        for other_path, other in redact.iter_manifests(folder):
            if other_path.resolve() == path.resolve():
                continue
            shares = targets & redact.shard_files(other)
            purged = (other.extra.get("retention") or {}).get("purged")
            if (shares or other.dataset == manifest.dataset) and not purged:
                _mark_purged(other, today)
                other.save(other_path)
    audit.append(
        audit_log or audit.default_log_path(path),
        "retention purge",
        dataset=manifest.dataset,
        version=manifest.version,
        shards_deleted=len(shards),
        bytes_deleted=size,
        deadline=st.deadline,
    )
    return result
