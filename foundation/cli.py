"""The `foundation` command: one entry point, one sub-command per stage.

Sub-commands import their stage lazily so that `foundation --help` stays fast and a stage's
heavy dependencies (torch, MONAI, transformers) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic PACS export (DICOM, NIfTI, reports, opt-outs)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ct-matrix", type=int, default=96, help="CT in-plane matrix size")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundation.synthetic import generate_cohort

    summary = generate_cohort(
        Path(args.out),
        n_patients=args.patients,
        seed=args.seed,
        ct_matrix=args.ct_matrix,
        progress=True,
    )
    print(summary)
    return 0


def _add_key_option(p: argparse.ArgumentParser) -> None:
    from foundation.evaluation.cli import add_key_option

    add_key_option(p)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="DICOM/NIfTI + reports -> pseudonymised shards + manifest")
    p.add_argument("--input", required=True, help="folder of the PACS export (DICOM/NIfTI)")
    p.add_argument("--reports", default=None, help="UTF-8 CSV of reports")
    p.add_argument("--report-id-column", default="accession_number")
    p.add_argument("--report-text-column", default="report")
    p.add_argument("--out", required=True, help="output folder (shards/, data_manifests/)")
    p.add_argument("--config", default=None, help="YAML ingest config (preprocessing, shards)")
    p.add_argument("--dataset", default=None, help="dataset name (default: from config)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: from config)")
    p.add_argument("--part", default="0/1", help="i/N: ingest part i of N (SLURM arrays)")
    p.add_argument(
        "--exclusion-list",
        default=None,
        help="exclusion list (opt-outs, erasures): its patients are never ingested; pass it "
        "to every re-ingest",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if another writer (erasure, rewrite) holds the dataset's lock, wait up to this long"
        " (default: fail at once, exit status 75)",
    )
    _add_key_option(p)
    p.set_defaults(handler=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundation.governance.cli import EXIT_LOCKED
    from foundation.governance.dataset_lock import DatasetLockedError
    from foundation.ingest.config import load_ingest_config
    from foundation.ingest.pipeline import parse_part, run_ingest
    from foundation.progress import print_summary

    config = load_ingest_config(args.config)
    if args.dataset:
        config.dataset = args.dataset
    if args.workers:
        config.workers = args.workers
    config.report_id_column = args.report_id_column
    config.report_text_column = args.report_text_column
    config.part = parse_part(args.part)
    try:
        result = run_ingest(
            Path(args.input),
            Path(args.out),
            reports_csv=Path(args.reports) if args.reports else None,
            config=config,
            key_file=Path(args.key_file) if args.key_file else None,
            exclusion_list=args.exclusion_list,
            lock_wait=args.wait,
        )
    except DatasetLockedError as e:  # as the governance writers: one line, retry later
        print(f"foundation: {e}", file=sys.stderr)
        return EXIT_LOCKED
    rows = [("samples", str(result.samples)), ("series seen", str(result.series_seen))]
    rows += [(f"modality {m}", str(n)) for m, n in sorted(result.by_modality.items())]
    rows += [(f"skipped: {r}", str(n)) for r, n in sorted(result.skipped.items())]
    rows += [
        ("studies without report", str(result.studies_without_report)),
        ("exclusion list", result.exclusion_version or "none"),
        ("seconds", f"{result.seconds:.1f}"),
        ("manifest", str(result.manifest_path)),
    ]
    print_summary("ingest", rows)
    return 0


def _add_optout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optout", help="the exclusion list: opt-out and erasure requests")
    osub = p.add_subparsers(dest="optout_command", required=True)
    imp = osub.add_parser("import", help="hash the patient IDs of a requests CSV into the list")
    imp.add_argument("requests", help="CSV: patient_id, request_type, date_received")
    imp.add_argument("--list", default="exclusion_list.json", help="exclusion list file")
    imp.add_argument("--id-column", default="patient_id")
    imp.add_argument("--type-column", default="request_type")
    imp.add_argument("--date-column", default="date_received")
    _add_key_option(imp)
    imp.set_defaults(handler=_run_optout_import)
    st = osub.add_parser("status", help="counts and version of the exclusion list")
    st.add_argument("--list", default="exclusion_list.json")
    st.add_argument("--manifest", default=None, help="also count the dataset's samples concerned")
    st.set_defaults(handler=_run_optout_status)


def _run_optout_import(args: argparse.Namespace) -> int:
    from foundation.privacy.exclusion import ExclusionList
    from foundation.privacy.pseudonym import load_key
    from foundation.progress import print_summary

    key = load_key(args.key_file)
    exclusion = ExclusionList.load(args.list, missing_ok=True)
    before = exclusion.version
    report = exclusion.import_requests(
        args.requests,
        key,
        id_column=args.id_column,
        type_column=args.type_column,
        date_column=args.date_column,
    )
    exclusion.save(args.list)
    rows = [
        ("rows", str(report.rows)),
        ("added", str(report.added)),
        ("already present", str(report.already_present)),
        ("rejected", str(len(report.bad_rows))),
        ("version", f"{before} -> {exclusion.version}"),
    ]
    rows += [(f"rejected line {line}", reason) for line, reason in report.bad_rows[:20]]
    print_summary(f"optout import into {args.list}", rows)
    return 0


def _run_optout_status(args: argparse.Namespace) -> int:
    from foundation.privacy.exclusion import ExclusionList
    from foundation.progress import print_summary

    exclusion = ExclusionList.load(args.list)
    rows = [("version", exclusion.version), ("patients", str(len(exclusion)))]
    rows += [(f"requests: {t}", str(n)) for t, n in exclusion.counts.items()]
    if args.manifest:
        from foundation.shards.manifest import Manifest

        manifest = Manifest.load(args.manifest)
        excluded = exclusion.pseudonyms
        samples = sum(s.samples - s.kept(excluded) for s in manifest.shards)
        shards = sum(1 for s in manifest.shards if s.kept(excluded) < s.samples)
        rows += [
            ("dataset", f"{manifest.dataset} v{manifest.version}"),
            ("patients present in dataset", str(len(excluded & manifest.patients()))),
            ("samples filtered at read time", str(samples)),
            ("shards holding them", str(shards)),
        ]
    print_summary(f"exclusion list {args.list}", rows)
    return 0


def _add_governance(sub: argparse._SubParsersAction) -> None:
    # optout apply, subject, retention, project, dataset merge, audit (after _add_optout)
    from foundation.governance.cli import add_parsers

    add_parsers(sub)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from foundation.inspect.cli import add_parsers

    add_parsers(sub)


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="check shards against their manifest")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    v = ssub.add_parser("verify", help="existence, size, sha256 and sample count of every shard")
    v.add_argument("manifest")
    v.add_argument("--fast", action="store_true", help="skip counting samples inside shards")
    v.set_defaults(handler=_run_shards_verify)


def _run_shards_verify(args: argparse.Namespace) -> int:
    from foundation.shards.verify import verify_manifest

    report = verify_manifest(args.manifest, check_samples=not args.fast)
    print(report.summary())
    return 0 if report.ok else 1


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="the report tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on the scrubbed reports of a dataset")
    t.add_argument("--manifest", required=True)
    t.add_argument("--out", required=True, help="folder (Hugging Face format)")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--kind", choices=("wordpiece", "bpe"), default="wordpiece")
    t.add_argument("--exclusion-list", default=None, help="leave these patients' reports out")
    t.set_defaults(handler=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> int:
    from foundation.data.report_corpus import train_tokenizer_from_manifest

    n = train_tokenizer_from_manifest(
        args.manifest,
        args.out,
        vocab_size=args.vocab_size,
        kind=args.kind,
        exclusion_list=args.exclusion_list,
    )
    from foundation.data.report_lengths import load
    from foundation.progress import print_summary

    stats = load(args.out) or {}
    p = stats.get("percentiles", [None] * 101)
    rows = {"reports": n, "folder": args.out, "tokens per report (median)": p[50]}
    rows |= {"tokens per report (p90)": p[90], "tokens per report (max)": p[100]}
    rows |= {f"share over {b} tokens": v for b, v in stats.get("truncated", {}).items()}
    print_summary("tokenizer", rows)
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain (LightningCLI): --config configs/pretrain/tiny.yaml [--section.key=value]",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from foundation.training.launch import main as pretrain_main

    return pretrain_main(args.args)


def _add_heads(sub: argparse._SubParsersAction) -> None:
    from foundation.evaluation.cli import add_parsers

    add_parsers(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from foundation.demo import DEFAULT_PATIENTS

    p = sub.add_parser("demo", help="run every stage end to end on a fresh synthetic cohort")
    p.add_argument("--out", default=None, help="keep everything in this folder (default: temp)")
    p.add_argument("--patients", type=int, default=DEFAULT_PATIENTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="shorter training and fewer resamples (CI)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from foundation.demo import run_demo

    run_demo(out=args.out, patients=args.patients, seed=args.seed, quick=args.quick)
    return 0


BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
    _add_ingest,
    _add_optout,
    _add_governance,
    _add_shards,
    _add_inspect,
    _add_tokenizer,
    _add_pretrain,
    _add_heads,  # finetune, evaluate, export
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foundation",
        description="Pretraining multimodal radiology foundation models on pseudonymised archives.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BUILDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `foundation` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain"] and not {"-h", "--help"} & set(argv[1:2]):
        # LightningCLI parses its own arguments (--config, --trainer.*, --model.*, --data.*)
        from foundation.training.launch import main as pretrain_main

        return pretrain_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
