"""The exclusion stage of the training stream: the list each epoch plans with, and the filter.

Two halves, one per process:

- main process, at each epoch start: ``load_excluded`` (re)loads the exclusion list, makes
  every DDP rank agree on one version (else ranks plan different batch counts and the job
  hangs), checks it was made under the manifest's pseudonymisation key, and narrows it to the
  patients the manifest holds (usually a few hundred, not the 1M-entry list: that small set is
  what every worker receives);
- worker, per shard: ``exclusion_filter`` drops the samples of those patients reading
  ``meta.json`` only (no image decode), and also any sample whose patient the manifest does not
  list for the shard, so a patient missing from the manifest cannot slip past the smaller set.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundation.sample import Sample
from foundation.shards.manifest import Manifest
from foundation.shards.reader import decode_meta

log = logging.getLogger(__name__)


def manifest_key_ids(manifest: Any) -> set[str]:
    """Key fingerprints of a dataset (several for one merged from several centres)."""
    from foundation.governance.merge import manifest_key_ids as ids

    return set(ids(manifest))


def load_exclusion_list(path: str) -> Any:
    """The project's ``ExclusionList`` at ``path`` (the default loader of ``ShardStream``)."""
    from foundation.privacy.exclusion import ExclusionList  # another module of the project

    return ExclusionList.load(path)


def load_excluded(
    path: str,
    loader: Callable[[str], Any],
    manifest: Manifest,
    patients: frozenset[str] | None,
    *,
    sync: bool,
) -> tuple[frozenset[str], str | None]:
    """The excluded patients among ``patients`` (all of the list when None) and its version.

    ``sync``: the layout comes from ``torch.distributed``, so under DDP the ranks compare
    versions and reload (the list file is replaced atomically) until they agree."""
    dist = torch.distributed
    ddp = sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for _ in range(5):
        lst = loader(path)
        if not ddp:
            break
        versions: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(versions, lst.version)
        if len(set(versions)) == 1:
            break
    else:
        raise RuntimeError(f"{path}: ranks keep reading different versions")
    key_id = getattr(lst, "key_id", None)
    if key_id and manifest.key_id and key_id not in manifest_key_ids(manifest):
        raise ValueError(f"{path}: made under another pseudonymisation key than the manifest")
    if patients is None:
        opted_out = frozenset(lst.pseudonyms)  # no copy when already a frozenset
    elif hasattr(lst, "among"):  # ExclusionList: no set of the whole list built
        opted_out = lst.among(patients)
    else:
        opted_out = patients.intersection(lst.pseudonyms)
    return opted_out, lst.version


def exclusion_filter(
    raw: Iterator[dict],
    shard: str,
    drop: frozenset[str],
    listed: dict[str, int] | None,
    stats: Counter[str],
) -> Iterator[dict]:
    """Drop samples of excluded patients, reading meta.json only (no image decode), and
    samples of a patient not in ``listed`` (the manifest's patients of ``shard``; None: no
    such check): ``drop`` holds only the listed ones, an unlisted patient could be an excluded
    one. Kept samples get their decoded ``meta``; ``stats`` counts excluded and unlisted."""
    for sample in raw:
        meta = decode_meta(sample, shard)
        patient = meta.get("patient")
        if patient in drop:
            stats["excluded"] += 1
            continue
        if listed is not None and patient not in listed:
            if not stats["unlisted"]:
                log.warning("%s: a sample of a patient the manifest does not list, dropped"
                            " (counted in stats['unlisted'])", shard)  # fmt: skip
            stats["unlisted"] += 1
            continue
        sample["meta"] = meta
        yield sample


# ---- fine-tuning and evaluation: one list for a whole run ------------------------------------
@dataclass
class Exclusion:
    """The patients of an exclusion list, and what they removed from a run."""

    patients: frozenset[str] = frozenset()  # the whole list: any sample's patient is tested
    version: str | None = None
    in_dataset: int = 0  # of them, patients the manifest lists
    dropped: int = 0  # samples skipped so far

    def drop(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        """``samples`` without those of the excluded patients (counted in ``dropped``)."""
        for s in samples:
            if s.meta.get("patient") in self.patients:
                self.dropped += 1
                continue
            yield s


def load_exclusion(manifest: str | Path, exclusion_list: str | Path | None) -> Exclusion:
    """The patients of ``exclusion_list`` (none when None). Samples are tested against the
    whole list, not only the patients the manifest lists (its records may be incomplete, and
    samples may come from elsewhere). A list made under another pseudonymisation key than the
    manifest's is refused, naming the list."""
    if not exclusion_list:
        return Exclusion()
    m = Manifest.load(manifest)
    patients, version = load_excluded(str(exclusion_list), load_exclusion_list, m, None, sync=False)
    return Exclusion(patients, version, in_dataset=len(patients & m.patients()))
