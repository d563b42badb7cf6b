"""The scrubbed reports of a dataset, as a corpus to train the report tokenizer on.

Reports are read from the shards (never from the raw export: only scrubbed text may reach
the tokenizer's vocabulary), without decoding images, and excluded patients are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from foundation.data import report_lengths
from foundation.data.tokenizer import train_tokenizer
from foundation.privacy.exclusion import ExclusionList
from foundation.shards.reader import iter_samples


def iter_reports(manifest: str | Path, exclusion_list: str | Path | None = None) -> Iterator[str]:
    """Each study's scrubbed report once, skipping excluded patients and empty reports."""
    excluded = ExclusionList.load(exclusion_list).pseudonyms if exclusion_list else frozenset()
    seen: set[str] = set()
    for sample in iter_samples(manifest, decode_image=False):
        study = sample.meta.get("study")
        if not sample.report or sample.meta.get("patient") in excluded or study in seen:
            continue
        seen.add(study)
        yield sample.report


def train_tokenizer_from_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    vocab_size: int = 8000,
    kind: str = "wordpiece",
    exclusion_list: str | Path | None = None,
) -> int:
    """Train and save a tokenizer on a dataset's reports; returns the number of reports.

    The reports' lengths in the new tokenizer's tokens are saved beside it
    (``report_lengths.json``), so a token budget that cuts reports can be seen before training.
    """
    reports = list(iter_reports(manifest, exclusion_list))
    if not reports:
        raise ValueError(f"{manifest}: no report to train a tokenizer on")
    tokenizer = train_tokenizer(reports, Path(out_dir), vocab_size=vocab_size, kind=kind)
    lengths = report_lengths.token_lengths(reports, tokenizer)
    report_lengths.save(report_lengths.summarise(lengths), out_dir)
    return len(reports)
