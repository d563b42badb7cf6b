"""`foundation finetune|evaluate|export`: biomarker heads, their evaluation, encoder export.

Register with ``add_parsers(sub)`` on the top-level sub-parsers; each sub-command sets
``handler`` like the other stages of ``foundation.cli``, and imports its stage lazily.
"""

from __future__ import annotations

import argparse


def add_key_option(p: argparse.ArgumentParser) -> None:
    """``--key-file``: the pseudonymisation key (default ``$FOUNDATION_PSEUDONYM_KEY``)."""
    p.add_argument(
        "--key-file",
        default=None,
        help="file holding the pseudonymisation key (default: $FOUNDATION_PSEUDONYM_KEY)",
    )


def key_or_none(key_file: str | None):
    """The key of ``--key-file`` (a missing or empty file is an error), else None: a table keyed
    by raw identifiers then takes its config's ``labels.key_file``, else
    ``$FOUNDATION_PSEUDONYM_KEY``; one keyed by pseudonyms needs none."""
    from foundation.privacy.pseudonym import load_key

    return load_key(key_file) if key_file else None


def add_exclusion_option(p: argparse.ArgumentParser, default_help: str) -> None:
    """``--exclusion-list``: opt-out/erasure list whose patients no head or probe reads."""
    p.add_argument(
        "--exclusion-list",
        default=None,
        help=f"exclusion list (foundation optout): its patients are left out ({default_help})",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune``, ``evaluate`` and ``export`` to the ``foundation`` command."""
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_export(sub)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune / probe biomarker heads from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.manifest=path (repeatable)",
    )
    p.add_argument(
        "--project", default=None, help="research project id: the dataset must be approved for it"
    )
    add_exclusion_option(p, "default: the config's data.exclusion_list")
    add_key_option(p)
    p.set_defaults(handler=_run_finetune)


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        dotted, value = pair.split("=", 1)
        node = out
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _check_usable_and_audit(manifest_path: str, project: str | None, action: str, **extra) -> None:
    """Refuse revoked or purged data, or data not approved for ``project``; log the use."""
    from foundation.governance import audit
    from foundation.governance.projects import check_usable
    from foundation.shards.manifest import Manifest

    manifest = Manifest.load(manifest_path)
    check_usable(manifest, project)
    audit.append(
        audit.default_log_path(manifest_path),
        action,
        dataset=manifest.dataset,
        dataset_version=manifest.version,
        project=project,
        **extra,
    )


def _run_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from foundation.progress import print_summary
    from foundation.training.finetune import run_finetune

    config = _merge(
        yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}, _overrides(args.set)
    )
    if args.exclusion_list:
        config.setdefault("data", {})["exclusion_list"] = args.exclusion_list
    manifest_path = (config.get("data") or {}).get("manifest")
    if manifest_path:
        _check_usable_and_audit(manifest_path, args.project, "finetune", config=str(args.config))
    result = run_finetune(config, key_or_none(args.key_file))
    rows = []
    for name, task in result.get("tasks", {}).items():
        m = task["metrics"][task["metric"]]
        ci = m.get("ci")
        rows.append(
            (
                name,
                task["metric"],
                f"{m['value']:.4f}",
                f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-",
            )
        )
    level = float((config.get("eval") or {}).get("level", 0.95))
    print_summary(
        "finetune (test split)", rows, columns=("task", "metric", "value", f"{level:.0%} CI")
    )
    labels, exclusion = result.get("labels") or {}, result.get("exclusion") or {}
    print(f"label rows that found a study: {labels.get('joined')} of {labels.get('rows')}; "
          f"patients left out by the exclusion list: {exclusion.get('excluded_patients', 0)}")  # fmt: skip
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot retrieval + probe suite, vs random init")
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (.ckpt)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--labels", default=None, help="label table for the probe suite")
    p.add_argument("--task", action="append", default=[], help="finetune config (repeatable)")
    add_exclusion_option(p, "default: the one the checkpoint was pretrained with")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--project", default=None, help="research project id: the dataset must be approved for it"
    )
    add_key_option(p)
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from foundation.evaluation.zero_shot import data_record, retrieval_vs_random
    from foundation.progress import print_summary

    if bool(args.labels) != bool(args.task):
        raise SystemExit("--labels and --task go together: the probe suite needs a label table"
                         " and at least one task config")  # fmt: skip
    _check_usable_and_audit(args.manifest, args.project, "evaluate", checkpoint=args.checkpoint)
    # the list the checkpoint was pretrained with, unless a (newer) one is given
    exclusion = args.exclusion_list or data_record(Path(args.checkpoint))[0].get("exclusion_list")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    retrieval = retrieval_vs_random(
        args.checkpoint, args.manifest, args.tokenizer, exclusion_list=exclusion
    )
    (out / "retrieval.json").write_text(json.dumps(retrieval, indent=2) + "\n", encoding="utf-8")
    rows = [
        (k, f"{retrieval['pretrained'][k]:.3f}", f"{retrieval['random_init'][k]:.3f}")
        for k in retrieval["pretrained"]
        if k.startswith(("i2t", "t2i", "chance"))
    ]
    print_summary(
        "zero-shot retrieval (held-out patients)",
        rows,
        columns=("recall", "pretrained", "random init"),
    )
    if args.labels and args.task:
        from foundation.evaluation.probe import run_probe_suite

        run_probe_suite(
            args.checkpoint,
            args.manifest,
            args.labels,
            args.task,
            key_or_none(args.key_file),
            out / "probes",
            exclusion_list=exclusion,
        )
        print(f"probe suite written to {out / 'probes' / 'results.md'}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export encoders as safetensors + JSON config")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (exports the text tower)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from foundation.models.export import export_encoder

    out = export_encoder(args.checkpoint, args.out, tokenizer_dir=args.tokenizer)
    print(f"exported to {out} (load with foundation.models.export.load_encoder)")
    return 0
