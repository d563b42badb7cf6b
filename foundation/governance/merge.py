"""Several manifests -> one dataset: exports of several centres, or the parts of one ingest.

Each centre ingests its export under its own key (so its own ``key_id``); the parts of one
ingest (``--part i/N``) share a key. ``merge`` writes one manifest whose shard paths are
relative to the merged manifest's folder, recording per shard the fingerprint of the key its
pseudonyms were made with (``extra["shard_key_ids"]``) and per part where it came from
(``extra["sources"]``). Duplicate sample keys are refused. The parts are marked
``extra["merged_into"]`` so that erasure and training go through the merged manifest only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tarfile
from pathlib import Path
from typing import Any

from foundation.governance import audit
from foundation.governance.dataset_lock import dataset_lock, hold
from foundation.shards.manifest import Manifest, ManifestError, ShardRecord


class MergeError(ManifestError):
    """The manifests cannot be merged (names the manifests and the reason)."""


def manifest_key_ids(manifest: Manifest) -> set[str]:
    """Fingerprints of every key the dataset's pseudonyms were made with."""
    ids = manifest.extra.get("shard_key_ids")
    return set(ids.values()) if ids else {manifest.key_id}


def shard_key_id(manifest: Manifest, record: ShardRecord) -> str:
    """Fingerprint of the key a shard's pseudonyms were made with."""
    return (manifest.extra.get("shard_key_ids") or {}).get(record.path, manifest.key_id)


def shard_keys(path: Path) -> list[str]:
    """Sample keys of a shard from its member names (webdataset cuts names at the first dot)."""
    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                if member.isreg() and (not keys or keys[-1] != key):
                    keys.append(key)
    except (tarfile.TarError, OSError) as e:
        raise MergeError(f"{path}: unreadable shard ({e.__class__.__name__})") from None
    return keys


def _check_part(part: Manifest, out: Path) -> None:
    if part.revoked_by is not None:
        raise MergeError(f"{part.location}: revoked (superseded by version {part.revoked_by})")
    if (part.extra.get("retention") or {}).get("purged"):
        raise MergeError(f"{part.location}: purged at the end of its retention period")
    merged = part.extra.get("merged_into")
    if merged and (Path(part.location).parent / merged).resolve() != out.resolve():
        raise MergeError(f"{part.location}: already merged into {merged}")


def _earliest_retention(parts: list[Manifest]) -> dict[str, Any] | None:
    dated = [
        p.extra["retention"] for p in parts if (p.extra.get("retention") or {}).get("deadline")
    ]
    return dict(min(dated, key=lambda r: r["deadline"])) if dated else None


def merge(
    paths: list[str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> Manifest:
    """Write the merged manifest at ``out`` and mark the parts merged; returns it.

    Holds the locks of ``out`` and of every part (``DatasetLockedError`` past ``lock_wait`` s).
    """
    out = Path(out)
    if len(paths) < 1:
        raise MergeError("nothing to merge")
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:  # merged first, then the parts sorted (see dataset_lock)
        if out.is_file():
            locks.enter_context(dataset_lock(out, wait=lock_wait, operation="dataset merge"))
        else:
            locks.enter_context(hold(out, wait=lock_wait, operation="dataset merge"))
        for part in sorted({Path(p).resolve() for p in paths if Path(p).is_file()}):
            locks.enter_context(dataset_lock(part, wait=lock_wait, operation="dataset merge"))
        return _merge(paths, out, name, audit_log)


def _merge(
    paths: list[str | Path], out: Path, name: str | None, audit_log: str | Path | None
) -> Manifest:
    parts = [Manifest.load(p) for p in paths]
    if len({Path(p.location).resolve() for p in parts}) != len(parts):
        raise MergeError("the same manifest is given twice")
    if out.exists() and Manifest.load(out).version != 1:
        raise MergeError(f"{out}: exists at a later version (erasures applied); refusing to merge")
    for part in parts:
        _check_part(part, out)
        if part.preprocessing != parts[0].preprocessing:
            raise MergeError(
                f"{part.location}: preprocessing spec differs from {parts[0].location}"
            )
    base = out.resolve().parent
    seen_keys: dict[str, Path] = {}
    seen_shards: set[Path] = set()
    shards: list[ShardRecord] = []
    shard_key_ids: dict[str, str] = {}
    sources: list[dict[str, Any]] = []
    for part in parts:
        for rec, shard in zip(part.shards, part.shard_paths(), strict=True):
            shard = shard.resolve()
            if shard in seen_shards:
                raise MergeError(f"{part.location}: shard {rec.path} is already in another part")
            seen_shards.add(shard)
            keys = rec.keys if rec.keys is not None else shard_keys(shard)
            for key in keys:
                if key in seen_keys:
                    raise MergeError(
                        f"{part.location}: sample key {key} also in {seen_keys[key]}; refusing"
                        " duplicate samples"
                    )
                seen_keys[key] = Path(part.location)
            new = dataclasses.replace(rec, path=os.path.relpath(shard, base))
            shards.append(new)
            shard_key_ids[new.path] = shard_key_id(part, rec)
        sources.append(
            {
                "manifest": os.path.relpath(Path(part.location).resolve(), base),
                "dataset": part.dataset,
                "version": part.version,
                "key_ids": sorted(manifest_key_ids(part)),
                "exclusion_version": part.exclusion_version,
                "shards": len(part.shards),
                "samples": part.num_samples,
            }
        )
    key_ids = sorted(set(shard_key_ids.values()))
    # a part ingested without an exclusion list says so ("none"): the merged version must not
    # claim for its shards a filtering they never had
    exclusions = sorted({p.exclusion_version or "none" for p in parts})
    if exclusions == ["none"]:
        exclusions = []
    extra: dict[str, Any] = {"sources": sources, "shard_key_ids": shard_key_ids}
    retention = _earliest_retention(parts)
    if retention:
        extra["retention"] = retention
    merged = Manifest(
        dataset=name or out.stem,
        key_id=key_ids[0] if len(key_ids) == 1 else "+".join(key_ids),
        shards=shards,
        preprocessing=parts[0].preprocessing,
        exclusion_version="+".join(exclusions) or None,
        shard_root=".",
        extra=extra,
    )
    merged.save(out)
    for part in parts:
        part.extra["merged_into"] = os.path.relpath(out.resolve(), Path(part.location).parent)
        part.save(part.location)
    audit.append(
        audit_log or audit.default_log_path(out),
        "dataset merge",
        dataset=merged.dataset,
        version=merged.version,
        parts=len(parts),
        key_ids=len(key_ids),
        shards=len(shards),
        samples=merged.num_samples,
    )
    return merged
