"""The ingest: a PACS export in, pseudonymised and preprocessed samples in shards out.

Stages, in order: find files by content -> scan headers into series -> keep this part's
studies -> leave out the exclusion list's patients (``exclude.py``) -> (in a process pool)
read the series, preprocess it, build its allow-listed meta and scrub its report -> write
shards -> ledger -> manifest. Everything not ingested is skipped with
a reason and counted; nothing raises out of the loop for one bad file.

Resumable: series are written in groups, and a group enters the ledger only once its shards
are complete and renamed, so a killed ingest re-run skips the groups it already finished and
rewrites only the one it was in. Parts (``--part i/N``) split the export by study, keyed, so
that N parts together hold exactly the samples one run would. A run holds the dataset's lock,
and never resumes into a dataset that an erasure (or another governance command) has changed
since: its ledger no longer describes it (``publish.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator, Set
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from foundation.ingest.discover import SeriesRef, find_dicom_files, scan_series
from foundation.ingest.exclude import check_resumed, load_for_ingest, split_excluded
from foundation.ingest.nifti import find_nifti_files, sidecar_dataset, sidecar_path
from foundation.ingest.preprocess import PreprocessConfig
from foundation.ingest.publish import manifest_path, publishing
from foundation.ingest.reports import ReportTable
from foundation.ingest.series_to_sample import SeriesTask, WorkerContext, process_series
from foundation.ingest.skip import EXCLUDED, quiet_reading
from foundation.ingest.volume import Skip
from foundation.privacy.deid import patient_pseudonym
from foundation.privacy.exclusion import ExclusionList
from foundation.privacy.pseudonym import PseudonymKey, load_key
from foundation.progress import progress_bar
from foundation.shards.manifest import Manifest, ShardRecord
from foundation.shards.writer import ShardWriter

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"


@dataclass
class IngestConfig:
    """What an ingest needs besides its inputs; every field has a sensible default."""

    dataset: str = "dataset"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    report_id_column: str = "accession_number"
    report_text_column: str = "report"
    shard_max_samples: int = 256
    shard_max_bytes: int = 1 << 30
    workers: int = 1
    part: tuple[int, int] = (0, 1)  # (index, count): this run ingests part index of count

    @property
    def part_tag(self) -> str:
        i, n = self.part
        return "" if n == 1 else f"part{i:03d}of{n:03d}"


@dataclass
class IngestResult:
    """Counts of an ingest (what the final table and ``ingest_summary.json`` show)."""

    samples: int = 0
    series_seen: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    by_modality: Counter = field(default_factory=Counter)
    studies_without_report: int = 0
    seconds: float = 0.0
    manifest_path: Path | None = None
    exclusion_version: str | None = None  # the exclusion list applied (None: no list given)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "series_seen": self.series_seen,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "by_modality": dict(sorted(self.by_modality.items())),
            "studies_without_report": self.studies_without_report,
            "seconds": round(self.seconds, 2),
            "manifest": str(self.manifest_path) if self.manifest_path else None,
            "exclusion_version": self.exclusion_version,
        }


def parse_part(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; parts are numbered from 0."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--part must look like i/N, got {text!r}") from err
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {text}: need 0 <= i < N")
    return i, n


def in_part(key: PseudonymKey, study_uid: str, part: tuple[int, int]) -> bool:
    """Keyed, stable split of studies across parts (all series of a study in one part)."""
    i, n = part
    return n == 1 or int(key.digest("part", study_uid)[:12], 16) % n == i


def _nifti_identifiers(path: Path) -> dict:
    """The sidecar of a NIfTI file (DICOM keywords), the one ``load_nifti`` reads; empty when
    absent or not an object (then skipped later)."""
    try:
        fields = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _header_ids(ref: SeriesRef, key: PseudonymKey) -> tuple[str | None, str | None]:
    """``(accession number, patient pseudonym)`` of a series from its first header, read
    without pixels (memory only); ``None`` for what is absent or unreadable."""
    try:
        with quiet_reading():
            ds = pydicom.dcmread(
                ref.files[0],
                stop_before_pixels=True,
                specific_tags=["AccessionNumber", "PatientID"],
            )
        return str(ds.get("AccessionNumber", "")).strip() or None, patient_pseudonym(ds, key)
    except Exception:  # unreadable now: the worker will skip it with a reason
        return None, None


def _tasks(
    series: list[SeriesRef],
    nifti: list[Path],
    key: PseudonymKey,
    part: tuple[int, int],
    reports: ReportTable,
) -> list[SeriesTask]:
    """One task per series of this part, with a series index stable across runs and parts.

    Series are grouped by study (DICOM StudyInstanceUID, or the sidecar's for NIfTI) and
    ordered within a study by a keyed pseudonym of their own identity, so the index depends on
    neither the file order nor the partition.
    """
    by_study: dict[str, list[tuple[str, SeriesTask]]] = {}
    for ref in series:
        ident = key.pseudonym("series", f"{ref.series_uid}/{_split_tag(ref)}")
        accession, patient = _header_ids(ref, key)
        task = SeriesTask(
            task_id=ident,
            series_index=-1,
            source=ref.files[0],
            dicom=ref,
            report=reports.get(accession),
            patient=patient,
        )
        by_study.setdefault(ref.study_uid, []).append((ident, task))
    for path in nifti:
        ids = _nifti_identifiers(path)
        study = str(ids.get("StudyInstanceUID") or ids.get("AccessionNumber") or path)
        ident = key.pseudonym("series", f"nifti/{ids.get('SeriesInstanceUID') or path.name}")
        task = SeriesTask(
            task_id=ident,
            series_index=-1,
            source=path,
            nifti=path,
            report=reports.get(ids.get("AccessionNumber")),
            patient=patient_pseudonym(sidecar_dataset(ids), key),
        )
        by_study.setdefault(study, []).append((ident, task))
    tasks: list[SeriesTask] = []
    for study_uid, items in by_study.items():
        if not in_part(key, study_uid, part):
            continue
        for index, (_, task) in enumerate(sorted(items, key=lambda it: it[0])):
            task.series_index = index
            tasks.append(task)
    return sorted(tasks, key=lambda t: t.task_id)


def _split_tag(ref: SeriesRef) -> str:
    """Sub-series of one SeriesInstanceUID (split by geometry) need distinct identities."""
    return str(getattr(ref, "split_tag", "") or getattr(ref, "sub_index", "") or "")


def _read_ledger(path: Path) -> tuple[list[dict], set[str]]:
    groups: list[dict] = []
    done: set[str] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                groups.append(entry)
                done.update(entry["tasks"])
    return groups, done


def _chunks(items: list[SeriesTask], size: int) -> Iterator[list[SeriesTask]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _mapper(pool: ProcessPoolExecutor | None, ctx: WorkerContext):
    """``map(tasks) -> outcomes`` in task order, in this process or the pool."""
    if pool is None:
        return lambda tasks: (process_series(t, ctx) for t in tasks)
    # map keeps order: the shards' content is independent of the number of workers
    return lambda tasks: pool.map(process_series, tasks, [ctx] * len(tasks), chunksize=1)


def run_ingest(
    input_dir: Path,
    out_dir: Path,
    *,
    reports_csv: Path | None = None,
    config: IngestConfig | None = None,
    key_file: Path | None = None,
    exclusion_list: str | os.PathLike | None = None,
    lock_wait: float = 0.0,
) -> IngestResult:
    """Ingest ``input_dir`` into shards and a manifest under ``out_dir`` (see module doc).

    ``exclusion_list``: the patients' opposition/erasure list; their series are left out
    before they are read (counted as ``excluded``) and its version goes in the manifest.
    The dataset's lock is held throughout (``DatasetLockedError`` if another writer holds it
    past ``lock_wait`` seconds), and a folder whose dataset governance has changed since its
    ingest (an erasure...) is refused (``GovernedDatasetError``, see ``publish.py``).
    """
    config = config or IngestConfig()
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found (the export to ingest)")
    key = load_key(key_file)  # no key, no run: fails before anything is read
    exclusion = load_for_ingest(exclusion_list, key)  # nor with a list that cannot be read
    out_dir.mkdir(parents=True, exist_ok=True)
    path = manifest_path(out_dir, config.dataset, config.part_tag)
    with publishing(path, wait=lock_wait):
        return _ingest(input_dir, out_dir, path, reports_csv, config, key, key_file, exclusion)


def _ingest(
    input_dir: Path,
    out_dir: Path,
    path: Path,
    reports_csv: Path | None,
    config: IngestConfig,
    key: PseudonymKey,
    key_file: Path | None,
    exclusion: ExclusionList | None,
) -> IngestResult:
    """``run_ingest`` under the dataset's lock: ``path`` is the manifest it publishes."""
    t0 = time.perf_counter()
    shard_dir = out_dir / "shards"
    tag = config.part_tag
    ledger_path = out_dir / (f"ledger.{tag}.jsonl" if tag else LEDGER_NAME)
    result = IngestResult()

    not_dicom: list[Skip] = []  # every other file is counted, never silently passed over
    dicom_paths = sorted(find_dicom_files(input_dir, skipped=not_dicom))
    series, scan_skips = scan_series(dicom_paths)
    nifti = sorted(find_nifti_files(input_dir))
    scan_counts = Counter(skip.reason for skip in [*not_dicom, *scan_skips])
    if not series and not nifti:  # a wrong --input must not publish an empty dataset
        other = ", ".join(f"{n} {r}" for r, n in sorted(scan_counts.items())) or "no file"
        raise ValueError(f"{input_dir}: no DICOM series or NIfTI image found ({other})")
    shard_dir.mkdir(exist_ok=True)
    reports = ReportTable.from_csv(
        reports_csv, id_column=config.report_id_column, text_column=config.report_text_column
    )
    tasks = _tasks(series, nifti, key, config.part, reports)
    result.series_seen = len(tasks)

    groups, done = _read_ledger(ledger_path)
    check_resumed(ledger_path, (r["patients"] for g in groups for r in g["shards"]), exclusion)
    _remove_partial_shards(shard_dir)
    todo, n_excluded = split_excluded([t for t in tasks if t.task_id not in done], exclusion)
    excluded = exclusion.pseudonyms if exclusion is not None else frozenset()
    ctx = WorkerContext(key_file=str(key_file) if key_file else None, preprocess=config.preprocess)
    next_index = groups[-1]["next_index"] if groups else 0
    prefix = f"{config.dataset}-{tag}" if tag else config.dataset
    # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock
    pool = (
        ProcessPoolExecutor(max_workers=config.workers, mp_context=mp.get_context("spawn"))
        if config.workers > 1
        else None
    )
    try:
        run = _mapper(pool, ctx)
        with progress_bar("ingest", total=len(todo)) as advance:
            for chunk in _chunks(todo, config.shard_max_samples):
                entry = _write_group(
                    chunk, run, config, shard_dir, prefix, next_index, advance, excluded
                )
                next_index = entry["next_index"]
                _append_ledger(ledger_path, entry)
                groups.append(entry)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    no_report: set[str] = set()
    if config.part[0] == 0:  # files outside any series: counted once, by part 0
        result.skipped.update(scan_counts)
    for g in groups:  # totals over this run and any earlier interrupted one
        result.samples += g["samples"]
        result.by_modality.update(g["by_modality"])
        result.skipped.update(g["skipped"])
        no_report.update(g["without_report"])
    if n_excluded:  # recounted by every run: excluded series never enter the ledger
        result.skipped[EXCLUDED] += n_excluded
    result.studies_without_report = len(no_report)
    result.exclusion_version = exclusion.version if exclusion is not None else None
    manifest = Manifest(
        dataset=config.dataset,
        key_id=key.key_id,
        preprocessing=config.preprocess.to_dict(),
        exclusion_version=result.exclusion_version,
        shards=[ShardRecord(**r) for g in groups for r in g["shards"]],
        shard_root=os.path.relpath(shard_dir, path.parent),
    )
    result.manifest_path = path
    manifest.save(path)
    result.seconds = time.perf_counter() - t0
    (out_dir / (f"ingest_summary.{tag}.json" if tag else "ingest_summary.json")).write_text(
        json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    return result


def _append_ledger(path: Path, entry: dict) -> None:
    """Append one finished group; fsync so a kill right after cannot lose it."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _remove_partial_shards(shard_dir: Path) -> None:
    """A kill leaves at most a temporary shard of an unfinished group: it is rewritten."""
    for tmp in shard_dir.glob("*.tmp"):
        tmp.unlink()


def _write_group(
    chunk: list[SeriesTask],
    run,
    config: IngestConfig,
    shard_dir: Path,
    prefix: str,
    start_index: int,
    advance,
    excluded: Set[str] = frozenset(),
) -> dict:
    """Process and write one group of series; returns its ledger entry.

    ``excluded``: a last guard, for a series whose first header named no listed patient but
    whose read header does: it is counted as excluded and not written (nor logged by path).
    """
    by_modality: Counter = Counter()
    skipped: Counter = Counter()
    without_report: set[str] = set()  # study pseudonyms
    samples = 0
    writer = ShardWriter(
        shard_dir,
        prefix=prefix,
        max_samples=config.shard_max_samples,
        max_bytes=config.shard_max_bytes,
        start_index=start_index,
    )
    with writer:
        for outcome in run(chunk):
            advance(1)
            if isinstance(outcome, Skip):
                skipped[outcome.reason] += 1
                log.info("skipped %s: %s", outcome.path, outcome.reason)
                continue
            if outcome.meta["patient"] in excluded:
                skipped[EXCLUDED] += 1
                continue
            writer.write(outcome)
            samples += 1
            by_modality[outcome.meta["modality"]] += 1
            if not outcome.report:
                without_report.add(outcome.meta["study"])
        records = writer.close()
    return {
        "tasks": [t.task_id for t in chunk],
        "shards": [dataclasses.asdict(r) for r in records],
        "samples": samples,
        "by_modality": dict(by_modality),
        "skipped": dict(skipped),
        "without_report": sorted(without_report),
        "next_index": start_index + len(records),
    }
