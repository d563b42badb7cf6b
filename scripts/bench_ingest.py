"""Ingest benchmark: the full ingest against bare ``pydicom.dcmread(...).pixel_array``.

All in one run, on the same files (a synthetic cohort, or ``--input`` an export of yours):
1. baseline: ``dcmread(f).pixel_array`` over every DICOM file (the floor of any DICOM reader);
2. the full ingest (``run_ingest``, one process, then ``--workers``): series/s and DICOM MB/s,
   printed as a ratio to the baseline;
3. the share of time per stage (read, preprocess, pseudonymise + scrub, write), measured by
   running the stages one by one over the same series in this process.

    python scripts/bench_ingest.py --patients 20           # synthetic cohort
    python scripts/bench_ingest.py --input EXPORT --reports reports.csv
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import pydicom

from foundation.ingest.config import load_ingest_config
from foundation.ingest.dicom import load_series
from foundation.ingest.discover import find_dicom_files, scan_series
from foundation.ingest.pipeline import _tasks, run_ingest
from foundation.ingest.preprocess import preprocess
from foundation.ingest.reports import ReportTable
from foundation.ingest.volume import Skip
from foundation.privacy.deid import DeidError, identifier_values, pseudonymised_meta
from foundation.privacy.pseudonym import generate_key_file, load_key
from foundation.privacy.scrub import scrub_report
from foundation.progress import print_summary
from foundation.sample import Sample, sample_key
from foundation.shards.writer import ShardWriter

REPO = Path(__file__).resolve().parents[1]


def bare_read(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        # non-image objects and broken files cost their read; decoding is what we time
        with contextlib.suppress(Exception):
            pydicom.dcmread(f).pixel_array  # noqa: B018
    return time.perf_counter() - t0


def stage_shares(export: Path, reports_csv: Path | None, key_file: Path, config, out: Path):
    """Time each stage separately over the DICOM series of the export."""
    key = load_key(key_file)
    series, _ = scan_series(sorted(find_dicom_files(export)))
    reports = ReportTable.from_csv(reports_csv)
    tasks = [t for t in _tasks(series, [], key, (0, 1), reports) if t.dicom is not None]
    times = {"read": 0.0, "preprocess": 0.0, "pseudonymise": 0.0, "write": 0.0}
    with ShardWriter(out, prefix="bench", max_samples=64) as writer:
        for task in tasks:
            t0 = time.perf_counter()
            vol = load_series(task.dicom)
            t1 = time.perf_counter()
            times["read"] += t1 - t0
            if isinstance(vol, Skip):
                continue
            array, image_meta = preprocess(vol, config.preprocess)
            t2 = time.perf_counter()
            try:
                meta = pseudonymised_meta(vol.header, key)
            except DeidError:
                continue
            report = scrub_report(
                task.report or "",
                identifier_values(vol.header),
                key.date_shift_days(str(vol.header.get("PatientID", ""))),
            )
            meta.update(image_meta, series_index=task.series_index, source_format="dicom")
            t3 = time.perf_counter()
            writer.write(Sample(sample_key(meta["study"], task.series_index), array, meta, report))
            t4 = time.perf_counter()
            times["preprocess"] += t2 - t1
            times["pseudonymise"] += t3 - t2
            times["write"] += t4 - t3
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=None, help="an export (default: synthetic)")
    ap.add_argument("--reports", type=Path, default=None)
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "ingest" / "default.yaml")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    key_file = tmp / "bench.key"
    generate_key_file(key_file)
    if args.input is None:
        from foundation.synthetic import generate_cohort

        cohort = generate_cohort(tmp / "cohort", n_patients=args.patients, seed=0)
        args.input, args.reports = cohort.export_dir, cohort.reports_csv
    files = sorted(find_dicom_files(args.input))
    mb = sum(f.stat().st_size for f in files) / 1e6

    base_s = bare_read(files)
    rows = [
        ("DICOM files", f"{len(files)}"),
        ("DICOM MB", f"{mb:.1f}"),
        ("bare dcmread+pixel_array MB/s", f"{mb / base_s:.1f}"),
    ]
    for workers in sorted({1, args.workers}):
        config = load_ingest_config(args.config)
        config.workers = workers
        t0 = time.perf_counter()
        res = run_ingest(
            args.input,
            tmp / f"out{workers}",
            reports_csv=args.reports,
            config=config,
            key_file=key_file,
        )
        dt = time.perf_counter() - t0
        rows += [
            (f"ingest, {workers} worker(s): series/s", f"{res.series_seen / dt:.2f}"),
            (f"ingest, {workers} worker(s): DICOM MB/s", f"{mb / dt:.1f}"),
            (f"ingest, {workers} worker(s) / bare read (throughput ratio)", f"{base_s / dt:.3f}"),
        ]
    times = stage_shares(
        args.input, args.reports, key_file, load_ingest_config(args.config), tmp / "stages"
    )
    total = sum(times.values())
    rows += [(f"share of time: {k}", f"{v / total:.1%} ({v:.2f} s)") for k, v in times.items()]
    print_summary(f"bench_ingest ({args.config.name})", rows)


if __name__ == "__main__":
    main()
