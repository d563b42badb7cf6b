"""One series in, one pseudonymised, preprocessed ``Sample`` (or a ``Skip``) out.

This is the unit of work of the ingest's process pool. It reads the series, preprocesses it,
builds its allow-listed meta and scrubs its report with the study's own header values as a
deny-list. It never raises: any failure becomes a ``Skip`` whose detail names the error type
only, because an exception message may quote a header value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from foundation.ingest.dicom import load_series
from foundation.ingest.discover import SeriesRef
from foundation.ingest.nifti import load_nifti
from foundation.ingest.preprocess import PreprocessConfig, preprocess
from foundation.ingest.volume import Skip, Volume
from foundation.privacy.deid import DeidError, identifier_values, pseudonymised_meta
from foundation.privacy.pseudonym import PseudonymKey, load_key
from foundation.privacy.scrub import scrub_report
from foundation.sample import Sample, sample_key

log = logging.getLogger(__name__)


@dataclass
class SeriesTask:
    """A series to ingest. Holds raw identifiers in memory only; never logged or written."""

    task_id: str  # keyed pseudonym of the series: what the ledger records
    series_index: int  # order of the series within its study (stable across runs and parts)
    source: Path  # a file of the series, for skip messages
    dicom: SeriesRef | None = None
    nifti: Path | None = None
    report: str | None = None  # raw report text of the study, scrubbed in process_series
    # keyed patient pseudonym from a header-only read (None without PatientID): what ingest
    # checks against the exclusion list before the series is read
    patient: str | None = field(default=None, repr=False)


@dataclass
class WorkerContext:
    """What every worker needs; small, so it is sent once per worker process."""

    key_file: str | None
    preprocess: PreprocessConfig


_keys: dict[str | None, PseudonymKey] = {}


def _key(ctx: WorkerContext) -> PseudonymKey:
    # The key cannot be pickled (by design): each worker process loads it itself.
    if ctx.key_file not in _keys:
        _keys[ctx.key_file] = load_key(ctx.key_file)
    return _keys[ctx.key_file]


def _read(task: SeriesTask) -> Volume | Skip:
    if task.dicom is not None:
        return load_series(task.dicom)
    assert task.nifti is not None
    return load_nifti(task.nifti)


def process_series(task: SeriesTask, ctx: WorkerContext) -> Sample | Skip:
    """Read, preprocess, pseudonymise and scrub one series; never raises."""
    try:
        volume = _read(task)
        if isinstance(volume, Skip):
            return volume
        key = _key(ctx)
        try:
            meta = pseudonymised_meta(volume.header, key)
        except DeidError as err:  # no PatientID / StudyInstanceUID: cannot be pseudonymised
            return Skip(reason=err.reason, path=task.source, detail="cannot pseudonymise")
        array, image_meta = preprocess(volume, ctx.preprocess)
        meta.update(image_meta)
        meta["series_index"] = task.series_index
        meta["source_format"] = volume.source_format
        report = ""
        if task.report:
            patient_id = str(volume.header.get("PatientID", "")).strip()
            report = scrub_report(
                task.report,
                deny=identifier_values(volume.header),
                shift_days=key.date_shift_days(patient_id),
            )
        sample = Sample(
            key=sample_key(meta["study"], task.series_index), image=array, meta=meta, report=report
        )
        sample.validate()
        return sample
    except Exception as err:  # one bad series never stops the ingest
        # the message may quote a header value: record the type only
        return Skip(reason="processing_error", path=task.source, detail=type(err).__name__)
