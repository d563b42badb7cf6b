"""Governance sub-commands of ``foundation``: optout apply, subject, retention, project,
dataset merge, audit. ``add_parsers(sub)`` adds them to the main parser (handlers import their
modules lazily). ``optout`` may already exist (import/status): ``apply`` is added to it, and its
``import`` handler is wrapped to append an audit entry.

Every command takes ``--audit-log`` (default: ``$FOUNDATION_AUDIT_LOG``, else ``audit.jsonl``
next to the manifest, or next to the exclusion list for ``optout import``). Commands that write
a manifest take ``--wait SECONDS``: how long to wait for another writer's lock on the dataset
(default 0: fail at once, exit status 75, "temporary failure: try again").
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-command group ``name`` (created, or found when another module added it)."""
    parser = sub.choices.get(name) or sub.add_parser(name, help=help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def _common(p: argparse.ArgumentParser, *, manifest: bool = True) -> None:
    if manifest:
        p.add_argument("--manifest", required=True, help="dataset manifest (current version)")
    p.add_argument("--audit-log", default=None, help="audit log (default: next to the manifest)")


def _wait_option(p: argparse.ArgumentParser, locked: str = "the dataset's lock") -> None:
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"if another writer holds {locked}, wait up to this long (default: fail at once)",
    )


def _keys_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key-file",
        action="append",
        default=None,
        help="pseudonymisation key file; repeat for a dataset merged from several "
        "centres (default: $FOUNDATION_PSEUDONYM_KEY)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the governance sub-commands to the ``foundation`` parser's sub-parsers."""
    optout = _group(sub, "optout", "the exclusion list: opt-out and erasure requests")
    p = optout.add_parser("apply", help="erase the listed patients from the shards (new version)")
    _common(p)
    p.add_argument(
        "--list",
        action="append",
        required=True,
        help="exclusion list (repeat for several centres' lists)",
    )
    p.add_argument(
        "--include-opposition",
        action="store_true",
        help="also erase patients who objected (default: erasure requests only)",
    )
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_optout_apply))
    imp = optout.choices.get("import")
    if imp is not None and imp.get_default("handler") is not None:
        imp.add_argument("--audit-log", default=None, help="audit log (default: next to --list)")
        _wait_option(imp, locked="the list's lock")
        imp.set_defaults(handler=_locked(_audited_import(imp.get_default("handler"))))

    subject = _group(sub, "subject", "data-subject access and rectification (art. 15, 16)")
    p = subject.add_parser("show", help="what the dataset holds for one person")
    _common(p)
    p.add_argument(
        "--patient-id",
        required=True,
        help="the person's ID, hashed and never printed ('-': read from stdin)",
    )
    p.add_argument("--export", default=None, help="folder to write the person's data to")
    p.add_argument("--format", choices=("npy", "nifti"), default="npy", help="3D image format")
    _keys_option(p)
    p.set_defaults(handler=_run_subject_show)
    p = subject.add_parser("rectify", help="correct reports/metadata from a CSV (new version)")
    _common(p)
    p.add_argument(
        "--csv",
        required=True,
        help="columns accession_number or study, field, value [, patient_id]",
    )
    _keys_option(p)
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_subject_rectify))

    retention = _group(sub, "retention", "retention deadlines and purge")
    p = retention.add_parser("set", help="record the retention deadline of a dataset")
    _common(p)
    p.add_argument("--last-publication", type=_date, required=True, help="YYYY-MM-DD")
    p.add_argument("--period-days", type=int, default=730)
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_retention_set))
    p = retention.add_parser("check", help="datasets past or near their deadline")
    p.add_argument("paths", nargs="+", help="manifests or folders of manifests")
    p.add_argument("--warn-days", type=int, default=90)
    p.add_argument("--today", type=_date, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_retention_check)
    p = retention.add_parser("purge", help="delete the shards of a dataset past its deadline")
    _common(p)
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    p.add_argument("--today", type=_date, default=None, help=argparse.SUPPRESS)
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_retention_purge))

    project = _group(sub, "project", "projects approved to use a dataset (purpose limitation)")
    p = project.add_parser("approve", help="approve a project until a date")
    _common(p)
    p.add_argument("--id", required=True, dest="project_id")
    p.add_argument("--approval", required=True, help="reference of the approval decision")
    p.add_argument("--expires", type=_date, required=True, help="last valid day, YYYY-MM-DD")
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_project_approve))
    p = project.add_parser("revoke", help="withdraw a project's approval")
    _common(p)
    p.add_argument("--id", required=True, dest="project_id")
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_project_revoke))

    dataset = _group(sub, "dataset", "datasets built from several centres or ingest parts")
    p = dataset.add_parser("merge", help="one manifest over several (centres, ingest parts)")
    p.add_argument("manifests", nargs="+")
    p.add_argument("--out", required=True, help="merged manifest, e.g. data_manifests/NAME.json")
    p.add_argument("--name", default=None, help="dataset name (default: the --out file stem)")
    _common(p, manifest=False)
    _wait_option(p)
    p.set_defaults(handler=_locked(_run_dataset_merge))

    aud = _group(sub, "audit", "the audit log and checkpoint lineage")
    p = aud.add_parser("verify", help="check the hash chain of an audit log")
    p.add_argument(
        "log", nargs="?", default=None, help="default: $FOUNDATION_AUDIT_LOG or ./audit.jsonl"
    )
    p.set_defaults(handler=_run_audit_verify)
    p = aud.add_parser("run", help="what a checkpoint was trained on; requests since")
    p.add_argument("checkpoint")
    p.add_argument("--manifest", required=True)
    p.add_argument("--list", action="append", default=[], help="exclusion list (repeatable)")
    p.set_defaults(handler=_run_audit_run)


# -- handlers -----------------------------------------------------------------------------


EXIT_LOCKED = 75  # EX_TEMPFAIL: another writer holds the dataset; retry later


def _locked(handler):
    """``handler`` with another writer's lock reported as one line on stderr (exit 75)."""

    def run(args: argparse.Namespace) -> int:
        from foundation.governance.dataset_lock import DatasetLockedError

        try:
            return handler(args)
        except DatasetLockedError as e:
            print(f"foundation: {e}", file=sys.stderr)
            return EXIT_LOCKED

    return run


def _summary(title: str, rows: list[tuple[str, Any]]) -> None:
    from foundation.progress import print_summary

    print_summary(title, [(k, "-" if v is None else str(v)) for k, v in rows])


def _keys(args: argparse.Namespace) -> list:
    from foundation.privacy.pseudonym import load_key

    return [load_key(f) for f in args.key_file] if args.key_file else [load_key(None)]


def _audited_import(handler):
    """``handler`` (read the list, add requests, write it) under the list's lock, so two
    imports into one list cannot both read the old file and the second write lose the first's
    requests; then one audit entry."""

    def run(args: argparse.Namespace) -> int:
        from foundation.governance import audit
        from foundation.governance.dataset_lock import hold
        from foundation.privacy.exclusion import ExclusionList

        with hold(args.list, wait=args.wait, operation="optout import"):
            before = ExclusionList.load(args.list, missing_ok=True).version
            code = handler(args)
            after = ExclusionList.load(args.list)
        audit.append(
            args.audit_log or audit.default_log_path(args.list),
            "optout import",
            list_version_before=before,
            exclusion_version=after.version,
            requests=after.counts,
            patients_listed=len(after),
        )
        return code

    return run


def _run_optout_apply(args: argparse.Namespace) -> int:
    from foundation.governance.erase import apply_erasure
    from foundation.privacy.exclusion import ExclusionList

    lists = [ExclusionList.load(p) for p in args.list]
    out = apply_erasure(
        args.manifest,
        lists,
        include_opposition=args.include_opposition,
        audit_log=args.audit_log,
        lock_wait=args.wait,
    )
    rows = [
        ("dataset", out.dataset),
        ("version now", out.version),
        ("exclusion version", out.exclusion_version),
        ("patients erased", out.patients_erased),
        ("shards rewritten", out.shards_rewritten),
        ("samples removed", out.samples_removed),
    ]
    if len(out.results) > 1 or (out.results and not out.patients_erased):
        rows.append(("resumed an interrupted run", "yes"))
    _summary(f"optout apply {args.manifest}", rows)
    return 0


def _read_patient_id(value: str) -> str:
    return sys.stdin.readline().strip() if value == "-" else value


def _run_subject_show(args: argparse.Namespace) -> int:
    from foundation.governance import subject

    pid, keys = _read_patient_id(args.patient_id), _keys(args)
    if args.export:
        r = subject.export_subject(
            args.manifest,
            keys,
            pid,
            args.export,
            image_format=args.format,
            audit_log=args.audit_log,
        )
    else:
        r = subject.find_subject(args.manifest, keys, pid, audit_log=args.audit_log)
    _summary(
        f"subject access: {r.dataset} v{r.version}",
        [
            ("samples", len(r.samples)),
            ("studies", len(r.studies)),
            ("modalities", ", ".join(r.modalities)),
            ("shards", len(r.shards)),
            ("manifest versions holding them", ", ".join(map(str, r.versions))),
            ("exported to", args.export),
        ],
    )
    if r.samples:
        from foundation.progress import print_summary

        rows = [
            (
                s.key,
                s.study_date or "-",
                s.modality,
                s.body_part or "-",
                "x".join(map(str, s.shape)),
                s.shard,
            )
            for s in r.samples
        ]
        print_summary(
            "samples",
            rows,
            columns=("sample", "shifted date", "modality", "body part", "shape", "shard"),
        )
    return 0


def _run_subject_rectify(args: argparse.Namespace) -> int:
    from foundation.governance import subject

    (key, *_) = _keys(args)
    result, bad = subject.rectify(
        args.manifest, args.csv, key, audit_log=args.audit_log, lock_wait=args.wait
    )
    rows: list[tuple[str, Any]] = [("rows rejected", len(bad))]
    rows += [(f"rejected line {line}", reason) for line, reason in bad[:20]]
    if result is None:
        rows.append(("changes", "none (nothing to rectify)"))
    else:
        rows += [
            ("version", f"{result.from_version} -> {result.to_version}"),
            ("shards rewritten", result.shards_rewritten),
            ("samples changed", result.samples_changed),
        ]
    _summary(f"subject rectify {args.manifest}", rows)
    return 0 if result is not None else 1


def _run_retention_set(args: argparse.Namespace) -> int:
    from foundation.governance.retention import set_retention

    rec = set_retention(
        args.manifest,
        args.last_publication,
        args.period_days,
        audit_log=args.audit_log,
        lock_wait=args.wait,
    )
    _summary(f"retention {args.manifest}", list(rec.items()))
    return 0


def _run_retention_check(args: argparse.Namespace) -> int:
    from foundation.governance.retention import check
    from foundation.progress import print_summary

    states = check(args.paths, today=args.today, warn_days=args.warn_days)
    rows = [
        (
            s.dataset,
            str(s.version),
            s.deadline or "-",
            "-" if s.days_left is None else str(s.days_left),
            s.state,
            s.manifest,
        )
        for s in states
    ]
    print_summary(
        "retention",
        rows,
        columns=("dataset", "version", "deadline", "days left", "state", "manifest"),
    )
    return 1 if any(s.state == "past" for s in states) else 0


def _run_retention_purge(args: argparse.Namespace) -> int:
    from foundation.governance.retention import purge

    r = purge(
        args.manifest, today=args.today, yes=args.yes, audit_log=args.audit_log, lock_wait=args.wait
    )
    verb = "would delete (dry run: add --yes)" if r.dry_run else "deleted"
    _summary(
        f"retention purge {args.manifest}",
        [
            ("dataset", f"{r.dataset} v{r.version}"),
            (f"shards {verb}", r.shards),
            ("bytes", r.bytes),
        ],
    )
    return 0


def _run_project_approve(args: argparse.Namespace) -> int:
    from foundation.governance.projects import approve

    rec = approve(
        args.manifest,
        args.project_id,
        args.approval,
        args.expires,
        audit_log=args.audit_log,
        lock_wait=args.wait,
    )
    _summary(f"project approved for {args.manifest}", list(rec.items()))
    return 0


def _run_project_revoke(args: argparse.Namespace) -> int:
    from foundation.governance.projects import revoke

    rec = revoke(args.manifest, args.project_id, audit_log=args.audit_log, lock_wait=args.wait)
    _summary(f"project revoked for {args.manifest}", list(rec.items()))
    return 0


def _run_dataset_merge(args: argparse.Namespace) -> int:
    from foundation.governance.merge import merge

    m = merge(
        args.manifests, args.out, name=args.name, audit_log=args.audit_log, lock_wait=args.wait
    )
    _summary(
        f"dataset merge -> {args.out}",
        [
            ("dataset", m.dataset),
            ("parts", len(m.extra["sources"])),
            ("shards", len(m.shards)),
            ("samples", m.num_samples),
            ("keys", len(set(m.extra["shard_key_ids"].values()))),
        ],
    )
    return 0


def _run_audit_verify(args: argparse.Namespace) -> int:
    from foundation.governance import audit

    report = audit.verify(args.log or audit.default_log_path())
    print(report.summary())
    return 0 if report.ok else 1


def _run_audit_run(args: argparse.Namespace) -> int:
    from foundation.governance.lineage import checkpoint_report
    from foundation.privacy.exclusion import ExclusionList

    report = checkpoint_report(
        args.checkpoint, args.manifest, [ExclusionList.load(p) for p in args.list]
    )
    rows = [(k, v) for k, v in report.items() if k != "dataset_changes_after"]
    rows += [
        (
            f"dataset change v{c['version']}",
            f"{c['action']} {c['time']}, {c['samples_removed']} samples removed",
        )
        for c in report["dataset_changes_after"]
    ]
    _summary(f"audit run {args.checkpoint}", rows)
    return 0
