"""Journaled rewrite of the shards that hold given samples: a new dataset version, crash-safe.

Erasure drops samples, rectification edits them; both rewrite only the shards that hold them
and publish version N+1 of the dataset. Layout: the current manifest keeps its file name
(``data_manifests/<dataset>.json``, what configs point to); version N-1 is kept, readable, as
``<dataset>.v<N-1>.json`` with ``revoked_by: N``. Rewritten shards get new names
(``<name>.v<N>.tar``), so nothing a reader may hold open changes under it.

The operation is a journal (``<manifest>.journal.json``) moved through phases; killed at any
point and re-run (``run``), it resumes from the phase on disk:

1. ``planned``  : journal written. Each affected shard is rewritten under its new name
   (tmp folder + rename) and recorded in the journal; the new shards are verified.
2. commit       : the old version is archived as ``<dataset>.v<N-1>.json`` (revoked_by N),
   then the current manifest is replaced atomically by version N -> ``committed``.
   (A kill between the two leaves the manifest at N-1 with its shards intact: still valid.)
3. cleanup      : the superseded shards are deleted; for an erasure every other manifest of
   the folder (archived versions, parts of a merged dataset) and the ingest ledgers are
   redacted of the erased patients, and manifests left pointing at deleted shards are marked
   revoked -> ``cleaned``.
4. the audit entry is appended (once: keyed by the operation id) and the journal removed.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.atomic import write_json_atomic
from foundation.governance import audit
from foundation.governance.dataset_lock import dataset_lock
from foundation.governance.redact import (
    JOURNAL_SUFFIX,
    iter_manifests,
    redact,
    redact_ledgers,
    related_folders,
    shard_files,
)
from foundation.progress import progress_bar
from foundation.sample import Sample
from foundation.shards.manifest import Manifest, ShardRecord, code_version
from foundation.shards.reader import decode_meta, decode_report, iter_shard, load_image
from foundation.shards.verify import verify_manifest
from foundation.shards.writer import ShardWriter

OPS = ("erase", "rectify")


class RewriteError(RuntimeError):
    """A rewrite cannot start or go on (names the manifest or shard and the reason)."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def journal_path(manifest_path: str | Path) -> Path:
    p = Path(manifest_path)
    return p.with_name(p.name + JOURNAL_SUFFIX)


def archive_path(manifest_path: str | Path, version: int) -> Path:
    """Where version ``version`` is kept once superseded: ``<stem>.v<version>.json``."""
    p = Path(manifest_path)
    return p.with_name(f"{p.stem}.v{version}.json")


def current_path(archived: str | Path) -> Path:
    """The current manifest of an archived version: ``<stem>.v<N>.json`` -> ``<stem>.json``."""
    p = Path(archived)
    head, dot, tail = p.stem.rpartition(".v")
    return p.with_name(f"{head}.json") if dot and tail.isdigit() else p


def versioned_name(shard_path: str, version: int) -> str:
    """``a/x-3d-000001.tar`` or ``x-3d-000001.v2.tar`` -> ``x-3d-000001.v<version>.tar``."""
    name = Path(shard_path).name
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    head, dot, tail = stem.rpartition(".v")
    if dot and tail.isdigit():
        stem = head
    return f"{stem}.v{version}.tar"


@dataclass
class Journal:
    """A pending operation on one manifest (see the module doc for the phases)."""

    op: str  # "erase" | "rectify"
    manifest: str  # file name of the current manifest
    from_version: int
    to_version: int
    affected: list[str]  # shard record paths to rewrite
    params: dict[str, Any]  # erase: {"patients": [...]}; rectify: {"changes": {study: {f: v}}}
    audit: dict[str, Any] = field(default_factory=dict)  # action + static fields of the entry
    exclusion_version: str | None = None
    audit_log: str | None = None  # where the final entry goes (kept for a resumed run)
    phase: str = "planned"  # planned -> committed -> cleaned
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # old path -> outcome
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: str = field(default_factory=_now)

    def save(self, manifest_path: Path) -> None:
        write_json_atomic(journal_path(manifest_path), dataclasses.asdict(self))


def pending(manifest_path: str | Path) -> Journal | None:
    """The unfinished operation of this manifest, if any."""
    path = journal_path(manifest_path)
    if not path.exists():
        return None
    try:
        return Journal(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise RewriteError(f"{path}: unreadable journal ({e.__class__.__name__})") from None


def start(manifest_path: str | Path, journal: Journal) -> None:
    """Record a new operation (nothing else changes); refuses if one is pending.

    Callers hold the dataset's lock from reading the version the journal starts from until
    ``run`` has published the next one (taken here too, for a caller that did not).
    """
    if journal.op not in OPS:
        raise RewriteError(f"unknown operation {journal.op!r}")
    with dataset_lock(manifest_path, operation=journal.op):
        if pending(manifest_path) is not None:
            raise RewriteError(f"{journal_path(manifest_path)}: an operation is pending; re-run it")
        journal.save(Path(manifest_path))


def sample_transform(op: str, params: dict[str, Any]) -> Callable[[Sample], Sample | None]:
    """What the operation does to one sample: ``None`` drops it, a new Sample replaces it."""
    if op == "erase":
        drop = frozenset(params["patients"])
        return lambda s: None if s.meta.get("patient") in drop else s
    if op == "rectify":
        changes: dict[str, dict[str, Any]] = params["changes"]

        def rectify(s: Sample) -> Sample:
            edits = changes.get(s.meta.get("study", ""))
            if not edits:
                return s
            meta, report = dict(s.meta), s.report
            for name, value in edits.items():
                if name == "report":
                    report = value
                else:
                    meta[name] = value
            return Sample(s.key, s.image, meta, report)

        return rectify
    raise RewriteError(f"unknown operation {op!r}")


@dataclass
class RewriteResult:
    op: str
    dataset: str
    from_version: int
    to_version: int
    shards_rewritten: int
    shards_emptied: int  # rewritten shards left with no sample (no new file)
    samples_dropped: int
    samples_changed: int
    seconds: float
    op_id: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_shard(
    old: Path, new_name: str, fn: Callable[[Sample], Sample | None]
) -> tuple[ShardRecord | None, list[str], int]:
    """Copy ``old`` through ``fn`` into ``old.parent/new_name``: (record, dropped keys, changed).

    The record's path is the new file name; ``None`` when no sample is left (no file).
    """
    tmp_dir = old.parent / f".rewrite-{new_name}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    dropped: list[str] = []
    changed = 0
    with ShardWriter(tmp_dir, prefix="rewrite", max_samples=1 << 62, max_bytes=1 << 62) as writer:
        for raw in iter_shard(str(old)):
            key = raw["__key__"]
            sample = Sample(
                key, load_image(raw, old.name), decode_meta(raw, old.name), decode_report(raw)
            )
            new = fn(sample)
            if new is None:
                dropped.append(key)
                continue
            changed += new is not sample
            writer.write(new)
        records = writer.close()
    if len(records) > 1:  # an old shard is homogeneous in dims: never more than one
        raise RewriteError(f"{old}: shard holds samples of several dims")
    record = None
    if records:
        record = records[0]
        os.replace(tmp_dir / record.path, old.parent / new_name)
        _fsync_dir(old.parent)
        record.path = new_name
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return record, dropped, changed


def _rewrite_all(j: Journal, current: Manifest, path: Path) -> None:
    fn = sample_transform(j.op, j.params)
    shard_dir = current.shard_dir
    with progress_bar(f"{j.op}: rewrite shards", total=len(j.affected)) as advance:
        for old in j.affected:
            outcome = j.done.get(old)
            if outcome is not None and all(
                (shard_dir / r["path"]).is_file()
                and (shard_dir / r["path"]).stat().st_size == r["bytes"]
                for r in outcome["records"]
            ):
                advance(1)
                continue  # finished before an interruption
            old_abs = shard_dir / old
            if not old_abs.is_file():
                raise RewriteError(f"{old_abs}: shard to rewrite is missing")
            record, dropped, changed = rewrite_shard(old_abs, versioned_name(old, j.to_version), fn)
            records = []
            if record is not None:
                rel = os.path.relpath(old_abs.parent / record.path, shard_dir)
                records.append(dataclasses.asdict(dataclasses.replace(record, path=rel)))
            j.done[old] = {"records": records, "dropped": dropped, "changed": changed}
            j.save(path)
            advance(1)


def _verify_new(j: Journal, current: Manifest, path: Path) -> None:
    records = [ShardRecord(**r) for o in j.done.values() for r in o["records"]]
    check = Manifest(
        dataset=current.dataset,
        key_id=current.key_id,
        shards=records,
        shard_root=str(current.shard_dir),
        code_version=current.code_version,  # (the default runs git describe)
    )
    report = verify_manifest(check)
    erased = frozenset(j.params.get("patients", ()))
    bad = {p.path for p in report.problems} | {
        r.path for r in records if erased & r.patients.keys()
    }
    if bad:  # forget them: the next run rewrites them again
        j.done = {o: v for o, v in j.done.items() if not {r["path"] for r in v["records"]} & bad}
        j.save(path)
        raise RewriteError(f"{path}: {len(bad)} rewritten shards failed verification; re-run")


def _history(j: Journal) -> dict[str, Any]:
    outcomes = j.done.values()
    return {
        "version": j.to_version,
        "action": j.op,
        "time": _now(),
        "exclusion_version": j.exclusion_version,
        "shards_rewritten": len(j.done),
        "samples_removed": sum(len(o["dropped"]) for o in outcomes),
        "samples_changed": sum(o["changed"] for o in outcomes),
    }


def _commit(j: Journal, current: Manifest, path: Path) -> None:
    shards: list[ShardRecord] = []
    for rec in current.shards:
        if rec.path in j.done:
            shards.extend(ShardRecord(**r) for r in j.done[rec.path]["records"])
        else:
            shards.append(rec)
    extra = copy.deepcopy(current.extra)
    extra.setdefault("history", []).append(_history(j))
    if "shard_key_ids" in extra:  # merged datasets: per-shard key fingerprint follows the rename
        ids = extra["shard_key_ids"]
        for old, outcome in j.done.items():
            kid = ids.pop(old, None)
            for r in outcome["records"]:
                ids[r["path"]] = kid
    new = dataclasses.replace(
        current,
        shards=shards,
        version=j.to_version,
        revoked_by=None,
        created=_now(),
        code_version=code_version(),
        extra=extra,
        exclusion_version=j.exclusion_version or current.exclusion_version,
    )
    old = dataclasses.replace(
        current, revoked_by=j.to_version, shards=copy.deepcopy(current.shards)
    )
    if j.op == "erase":
        redact(old, frozenset(j.params["patients"]), _dropped_keys(j))
    old.save(archive_path(path, j.from_version))
    new.save(path)


def _dropped_keys(j: Journal) -> frozenset[str]:
    return frozenset(k for o in j.done.values() for k in o["dropped"])


def _cleanup(j: Journal, path: Path) -> None:
    current = Manifest.load(path)
    shard_dir = current.shard_dir
    live = shard_files(current)
    deleted: set[Path] = set()
    for old in j.affected:
        old_abs = Path(os.path.normpath(shard_dir / old))
        tmp_dir = old_abs.parent / f".rewrite-{versioned_name(old, j.to_version)}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_abs not in live:
            old_abs.unlink(missing_ok=True)
            deleted.add(old_abs)
    patients = frozenset(j.params.get("patients", ())) if j.op == "erase" else frozenset()
    keys = _dropped_keys(j)
    here = path.resolve()
    # only manifests that name an erased patient or a deleted shard need a look
    needles = sorted(patients) + sorted({p.name for p in deleted})
    for folder in related_folders(current, path):
        for other_path, other in iter_manifests(folder, needles):
            if other_path.resolve() == here:
                continue
            changed = redact(other, patients, keys) if patients else False
            if other.revoked_by is None and deleted & shard_files(other):
                other.revoked_by = j.to_version
                other.extra["superseded_by"] = {
                    "manifest": os.path.relpath(here, other_path.resolve().parent),
                    "dataset": current.dataset,
                    "version": j.to_version,
                }
                changed = True
            if changed:
                other.save(other_path)
    if patients:
        redact_ledgers({p.parent.parent for p in deleted} | {shard_dir.parent}, patients, keys)


def run(
    manifest_path: str | Path, *, audit_log: str | Path | None = None, lock_wait: float = 0.0
) -> RewriteResult:
    """Carry the pending operation of ``manifest_path`` to its end, from whatever phase, under
    the dataset's lock (``DatasetLockedError`` if another writer holds it past ``lock_wait`` s)."""
    with dataset_lock(manifest_path, wait=lock_wait, operation="rewrite"):
        return _run(Path(manifest_path), audit_log)


def _run(path: Path, audit_log: str | Path | None) -> RewriteResult:
    j = pending(path)
    if j is None:
        raise RewriteError(f"{path}: no pending operation")
    t0 = time.perf_counter()
    audit_log = audit_log if audit_log is not None else j.audit_log
    if j.phase == "planned":
        current = Manifest.load(path)
        if current.version == j.from_version:
            _rewrite_all(j, current, path)
            _verify_new(j, current, path)
            _commit(j, current, path)
        elif current.version != j.to_version:
            raise RewriteError(
                f"{path}: manifest is at version {current.version}, the journal goes from"
                f" {j.from_version} to {j.to_version}; resolve by hand"
            )
        j.phase = "committed"
        j.save(path)
    if j.phase == "committed":
        _cleanup(j, path)
        j.phase = "cleaned"
        j.save(path)
    hist = _history(j)
    result = RewriteResult(
        op=j.op,
        dataset=Manifest.load(path).dataset,
        from_version=j.from_version,
        to_version=j.to_version,
        shards_rewritten=hist["shards_rewritten"],
        shards_emptied=sum(1 for o in j.done.values() if not o["records"]),
        samples_dropped=hist["samples_removed"],
        samples_changed=hist["samples_changed"],
        seconds=time.perf_counter() - t0,
        op_id=j.op_id,
    )
    if audit_log is not None and not audit.has_operation(audit_log, j.op_id):
        fields = dict(j.audit)
        action = fields.pop("action", j.op)
        audit.append(
            audit_log,
            action,
            op_id=j.op_id,
            dataset=result.dataset,
            from_version=j.from_version,
            to_version=j.to_version,
            exclusion_version=j.exclusion_version,
            shards_rewritten=result.shards_rewritten,
            samples_removed=result.samples_dropped,
            samples_changed=result.samples_changed,
            **fields,
        )
    journal_path(path).unlink(missing_ok=True)
    return result
