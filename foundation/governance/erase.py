"""Erasure (GDPR art. 17) and, on request, opposition (art. 21) applied to the shards.

``foundation optout apply``: the patients of the exclusion list(s) still present in a dataset
are removed from the shards that hold them (and only those), as a new dataset version through
the journaled rewrite of ``foundation.governance.rewrite`` (crash-safe, resumable). The read-time
filter of the stream already hides them at once; this makes the removal physical.

``check_not_revoked`` is what a training entry point calls on a manifest before using it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from foundation.governance import rewrite
from foundation.governance.audit import default_log_path
from foundation.governance.dataset_lock import dataset_lock
from foundation.governance.merge import manifest_key_ids
from foundation.privacy.exclusion import ExclusionList
from foundation.shards.manifest import Manifest, ManifestError


class RevokedManifestError(ManifestError):
    """The manifest is a superseded (revoked), purged or merged-away dataset version."""


def check_not_revoked(manifest: Manifest) -> None:
    """Raise ``RevokedManifestError`` naming the manifest to use instead, if ``manifest`` was
    superseded by a newer version, merged into another dataset, or purged at retention end."""
    where = manifest.location or manifest.dataset
    if manifest.revoked_by is not None:
        sup = manifest.extra.get("superseded_by") or {}
        if sup.get("manifest"):
            target = (
                f"{sup['manifest']} (dataset {sup.get('dataset')} version {sup.get('version')})"
            )
        else:
            current = rewrite.current_path(str(where)).name
            target = f"version {manifest.revoked_by} ({current} in the same folder)"
        raise RevokedManifestError(
            f"{where}: dataset {manifest.dataset} version {manifest.version} was revoked"
            f" (erasure or rectification); use {target}"
        )
    retention = manifest.extra.get("retention") or {}
    if retention.get("purged"):
        raise RevokedManifestError(
            f"{where}: dataset {manifest.dataset} was purged on {retention['purged']} "
            "(retention period over); it may no longer be used"
        )
    merged = manifest.extra.get("merged_into")
    if merged:
        raise RevokedManifestError(
            f"{where}: this part was merged into {merged}; use that manifest"
        )


def combined_version(lists: list[ExclusionList]) -> str | None:
    """The exclusion version recorded for one or several lists (several: joined by '+')."""
    if not lists:
        return None
    return "+".join(sorted(lst.version for lst in lists))


def patients_to_erase(
    manifest: Manifest, lists: list[ExclusionList], *, include_opposition: bool = False
) -> frozenset[str]:
    """Pseudonyms of the lists' erasure (and opposition) requests present in the dataset.

    A list made under a key the dataset does not use is refused (its pseudonyms cannot match).
    """
    key_ids = manifest_key_ids(manifest)
    wanted: set[str] = set()
    for lst in lists:
        if lst.key_id is not None and lst.key_id not in key_ids:
            raise ManifestError(
                f"{manifest.location}: an exclusion list was made under a pseudonymisation key"
                " this dataset does not use"
            )
        wanted |= lst.pseudonyms_for("erasure")
        if include_opposition:
            wanted |= lst.pseudonyms_for("opposition")
    return frozenset(wanted & manifest.patients())


@dataclass
class ErasureOutcome:
    dataset: str
    version: int  # the current version after the run
    patients_erased: int
    exclusion_version: str | None
    results: list[rewrite.RewriteResult]  # a resumed operation first, then this one

    @property
    def shards_rewritten(self) -> int:
        return sum(r.shards_rewritten for r in self.results)

    @property
    def samples_removed(self) -> int:
        return sum(r.samples_dropped for r in self.results)


def apply_erasure(
    manifest_path: str | Path,
    lists: list[ExclusionList],
    *,
    include_opposition: bool = False,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> ErasureOutcome:
    """Remove the listed patients from the dataset's shards (new version); resumable.

    An operation left pending by an interrupted run is finished first. The audit entry holds
    counts and the exclusion version, never a pseudonym. The dataset's lock is held throughout
    (``DatasetLockedError`` if another writer holds it past ``lock_wait`` seconds).
    """
    with dataset_lock(manifest_path, wait=lock_wait, operation="optout apply"):
        return _apply_erasure(Path(manifest_path), lists, include_opposition, audit_log)


def _apply_erasure(
    path: Path,
    lists: list[ExclusionList],
    include_opposition: bool,
    audit_log: str | Path | None,
) -> ErasureOutcome:
    log = Path(audit_log) if audit_log is not None else default_log_path(path)
    results = []
    if rewrite.pending(path) is not None:
        results.append(rewrite.run(path, audit_log=log))
    manifest = Manifest.load(path)
    check_not_revoked(manifest)
    targets = patients_to_erase(manifest, lists, include_opposition=include_opposition)
    version = combined_version(lists)
    if targets:
        affected = [r.path for r in manifest.shards if targets & r.patients.keys()]
        journal = rewrite.Journal(
            op="erase",
            manifest=path.name,
            from_version=manifest.version,
            to_version=manifest.version + 1,
            affected=affected,
            params={"patients": sorted(targets)},
            audit={
                "action": "optout apply",
                "patients_erased": len(targets),
                "include_opposition": include_opposition,
            },
            exclusion_version=version,
            audit_log=str(log),
        )
        rewrite.start(path, journal)
        results.append(rewrite.run(path, audit_log=log))
    elif not results:
        from foundation.governance import audit

        audit.append(
            log,
            "optout apply",
            dataset=manifest.dataset,
            from_version=manifest.version,
            to_version=manifest.version,
            exclusion_version=version,
            patients_erased=0,
            include_opposition=include_opposition,
        )
    final = Manifest.load(path)
    return ErasureOutcome(final.dataset, final.version, len(targets), version, results)
