"""What erasure and purge do to the other records of a dataset: archived versions, the parts
a dataset was merged from, ingest ledgers. Each may name a patient or point at a deleted shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from foundation.shards.manifest import Manifest, ManifestError

JOURNAL_SUFFIX = ".journal.json"


def redact(manifest: Manifest, patients: frozenset[str], keys: frozenset[str]) -> bool:
    """Drop patients and sample keys from every shard record; True if anything changed."""
    changed = False
    for rec in manifest.shards:
        if patients & rec.patients.keys():
            rec.patients = {p: n for p, n in rec.patients.items() if p not in patients}
            changed = True
        if rec.keys is not None and keys.intersection(rec.keys):
            rec.keys = [k for k in rec.keys if k not in keys]
            changed = True
    return changed


def shard_files(manifest: Manifest) -> set[Path]:
    """Absolute, normalised shard paths (string operations only: no syscall per shard)."""
    root = manifest.shard_dir
    return {Path(os.path.normpath(root / r.path)) for r in manifest.shards}


def iter_manifests(
    folder: Path, needles: list[str] | None = None
) -> Iterator[tuple[Path, Manifest]]:
    """Every readable manifest in ``folder`` (other JSON files are skipped); with ``needles``,
    only those whose text contains one of them (a cheap filter before parsing)."""
    for f in sorted(folder.glob("*.json")):
        if f.name.endswith(JOURNAL_SUFFIX):
            continue
        if needles is not None:
            text = f.read_text(encoding="utf-8", errors="replace")
            if not any(n in text for n in needles):
                continue
        try:
            yield f, Manifest.load(f)
        except ManifestError:
            continue


def related_folders(manifest: Manifest, path: Path) -> set[Path]:
    """The manifest's folder and those of the manifests it was merged from."""
    folders = {path.resolve().parent}
    for src in manifest.extra.get("sources", []):
        folders.add((path.resolve().parent / src["manifest"]).resolve().parent)
    return {f for f in folders if f.is_dir()}


def redact_ledgers(
    folders: set[Path], patients: set[str] | frozenset[str], keys: set[str] | frozenset[str]
) -> int:
    """Drop patients, keys and studies from the ingest ledgers' shard records (``ledger*.jsonl``
    in ``folders``); returns the number of ledgers changed."""
    studies = {k.rsplit("_", 1)[0] for k in keys}
    changed = 0
    for folder in folders:
        for ledger in sorted(folder.glob("ledger*.jsonl")):
            lines = ledger.read_text(encoding="utf-8").splitlines()
            out = []
            for line in lines:
                if not line.strip():
                    continue
                entry = json.loads(line)
                for rec in entry.get("shards", []):
                    rec["patients"] = {
                        p: n for p, n in rec.get("patients", {}).items() if p not in patients
                    }
                    if rec.get("keys") is not None:
                        rec["keys"] = [k for k in rec["keys"] if k not in keys]
                if "without_report" in entry:
                    entry["without_report"] = [
                        s for s in entry["without_report"] if s not in studies
                    ]
                out.append(json.dumps(entry))
            if out != lines:
                tmp = ledger.with_name(f".{ledger.name}.tmp")
                tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
                os.replace(tmp, ledger)
                changed += 1
    return changed
