"""Where an ingest publishes its manifest, and when it may: one writer at a time, and never over
a dataset that governance has changed since.

An ingest rebuilds its manifest from its ledger (``pipeline.py``): the groups of shards it
wrote, as it wrote them. Once an erasure or rectification has published version 2, the ledger
names shards that were deleted, and republishing from it would bring back version 1 over the
erasure: a manifest that names missing files, counts the erased samples and drops the dataset's
history (and, from a re-export ingested without the exclusion list, the erased patient's new
series). A retention record, project approvals or a merge, made in place on version 1, would be
dropped the same way. So an ingest resumes only into a folder whose manifest is still as an
ingest left it; anything else is refused before a file is read, with the way forward: ingest
the new studies into a new folder and combine the two with ``foundation dataset merge``.

The whole ingest holds the dataset's lock (``governance.dataset_lock``, operation ``ingest``):
from the check above to the published manifest, no erasure can rewrite shards or redact the
ledger under it, and an ingest started while another writer holds the lock fails at once
(``DatasetLockedError``; the CLI exits with status 75 and takes ``--wait SECONDS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from foundation.governance.dataset_lock import hold
from foundation.governance.redact import JOURNAL_SUFFIX
from foundation.shards.manifest import Manifest, ManifestError

MANIFEST_DIR = "data_manifests"


class GovernedDatasetError(ManifestError):
    """The folder's dataset was changed by a governance writer: an ingest may not publish."""


def manifest_path(out_dir: Path, dataset: str, part_tag: str = "") -> Path:
    """``<out>/data_manifests/<dataset>[.<part tag>].json``: what an ingest publishes."""
    name = f"{dataset}.{part_tag}.json" if part_tag else f"{dataset}.json"
    return out_dir / MANIFEST_DIR / name


def _archived_versions(path: Path) -> list[Path]:
    """``<stem>.v<N>.json`` beside ``path``: versions an erasure or rectification superseded."""
    prefix = f"{path.stem}.v"
    return sorted(
        p
        for p in path.parent.glob(f"{path.stem}.v*.json")
        if p.name[len(prefix) : -len(".json")].isdigit()
    )


def governed_by(path: Path) -> str | None:
    """Why the manifest at ``path`` is no longer the ingest's to publish (None: it is, or it does
    not exist yet). An ingest writes version 1, not revoked, with an empty ``extra``; every
    governance writer bumps the version, archives one, leaves a journal or marks ``extra``."""
    journal = path.with_name(path.name + JOURNAL_SUFFIX)
    if journal.exists():
        return "an erasure or rectification of it is pending (re-run it to finish)"
    if not path.exists():
        return None
    manifest = Manifest.load(path)  # unreadable: ManifestError naming the file
    if manifest.version != 1:
        return f"it is at version {manifest.version} (erasure or rectification applied)"
    if manifest.revoked_by is not None:
        return f"it was revoked by version {manifest.revoked_by}"
    if manifest.extra:
        marks = ", ".join(sorted(manifest.extra))
        return f"a governance command recorded {marks} in it"
    archived = _archived_versions(path)
    if archived:
        return f"archived versions of it exist ({archived[-1].name})"
    return None


def check_ingest_owned(path: Path) -> None:
    """Raise ``GovernedDatasetError`` naming the manifest, the reason and the way forward when
    an ingest may not (re)publish it (see ``governed_by``)."""
    reason = governed_by(path)
    if reason is not None:
        folder = path.parent.parent
        raise GovernedDatasetError(
            f"{path}: {reason}; an ingest cannot resume into {folder} or add to it. Ingest new"
            " studies into a new folder (with --exclusion-list) and combine the two with"
            " `foundation dataset merge`"
        )


@contextlib.contextmanager
def publishing(path: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of the manifest at ``path`` (``wait`` seconds at most) and check that the
    ingest may publish it; the caller ingests and publishes inside the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with hold(path, wait=wait, operation="ingest"):
        check_ingest_owned(path)
        yield
