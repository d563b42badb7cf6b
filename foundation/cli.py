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
    p = sub.add_parser("synth", help="write a synthetic PACS export (DICOM, NIfTI, reports, opt-outs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ct-matrix", type=int, default=96, help="CT in-plane matrix size")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundation.synthetic import generate_cohort

    summary = generate_cohort(
        Path(args.out), n_patients=args.patients, seed=args.seed, ct_matrix=args.ct_matrix,
        progress=True,
    )
    print(summary)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run every stage end to end on a fresh synthetic cohort")
    p.add_argument("--out", default=None, help="keep everything in this folder (default: temp)")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller cohort and shorter training (CI)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from foundation.demo import run_demo

    run_demo(out=args.out, patients=args.patients, seed=args.seed, quick=args.quick)
    return 0


BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_synth, _add_demo]


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
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
