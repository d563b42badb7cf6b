"""The ingest's exclusion stage: patients of the exclusion list never reach the shards.

A hospital that re-exports its PACS after an erasure (or an opposition) would otherwise write
the patient back. Each series carries the keyed pseudonym of its patient, computed on a
header-only read exactly as ``pseudonymised_meta`` computes it; a listed patient's series are
dropped here, before any pixel or report is processed, and counted under the reason
``excluded``. Nothing names them: no path, pseudonym or UID is logged or recorded, only counts
and the list's version (the manifest's ``exclusion_version``). Both request types are honoured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Set
from pathlib import Path

from foundation.ingest.series_to_sample import SeriesTask
from foundation.privacy.exclusion import ExclusionError, ExclusionList
from foundation.privacy.pseudonym import PseudonymKey

log = logging.getLogger(__name__)


def load_for_ingest(path: str | os.PathLike | None, key: PseudonymKey) -> ExclusionList | None:
    """The list at ``path`` (None: no list), refused when made under another key.

    A missing or unreadable file fails the ingest (``ExclusionError`` naming the file): a
    re-ingest that silently ran without its list would write erased patients back.
    """
    if path is None:
        return None
    exclusion = ExclusionList.load(path)
    if exclusion.key_id is not None and exclusion.key_id != key.key_id:
        raise ExclusionError(
            f"{path}: the exclusion list was made under another pseudonymisation key"
        )
    return exclusion


def split_excluded(
    tasks: list[SeriesTask], exclusion: ExclusionList | None
) -> tuple[list[SeriesTask], int]:
    """``(tasks to process, number of series left out)``: a task is left out when its patient
    pseudonym is in the list. Its report is dropped with it (never scrubbed nor written)."""
    if exclusion is None or not tasks:
        return tasks, 0
    listed = exclusion.among({t.patient for t in tasks if t.patient is not None})
    kept = [t for t in tasks if t.patient not in listed]
    n = len(tasks) - len(kept)
    if n:
        log.info("left out %d series of listed patients (exclusion list %s)", n, exclusion.version)
    return kept, n


def check_resumed(
    ledger: Path, shard_patients: Iterable[Set[str]], exclusion: ExclusionList | None
) -> None:
    """Refuse to resume over shards of an earlier run that hold patients now listed.

    ``shard_patients``: the patient pseudonyms of each shard already in the ledger. Those
    shards would enter a manifest that claims the list was applied; the fix is an erasure
    (``foundation optout apply``) or an ingest into a new folder.
    """
    if exclusion is None:
        return
    held: set[str] = set()
    for patients in shard_patients:
        held.update(patients)
    if exclusion.among(held):
        raise ExclusionError(
            f"{ledger}: shards of an earlier run in this folder hold patients of the exclusion "
            "list; run `foundation optout apply` on its manifest or ingest into a new folder"
        )
