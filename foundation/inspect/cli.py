"""`foundation inspect shards|run`: look at what the model is fed, and at how the run goes.

Register with ``add_parsers(sub)`` on the top-level sub-parsers; each sub-command sets
``handler`` like the other stages of ``foundation.cli``.
"""

from __future__ import annotations

import argparse


def _size(text: str) -> tuple[int, ...]:
    """``"96,96,96"`` or ``"96x96x96"`` -> ``(96, 96, 96)``."""
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected sizes like 96,96,96, got {text!r}") from err


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect shards`` and ``inspect run`` to the ``foundation`` command."""
    p = sub.add_parser("inspect", help="montage of samples, curves of a run (PNG)")
    isub = p.add_subparsers(dest="inspect_command", required=True)

    s = isub.add_parser(
        "shards", help="montage of samples as the model sees them (3 planes for 3D)"
    )
    s.add_argument("manifest", help="dataset manifest (data_manifests/*.json)")
    s.add_argument("--out", default="montage.png", help="PNG to write")
    s.add_argument("--n", type=int, default=12, help="samples to show (balanced by modality)")
    s.add_argument("--exclusion-list", default=None, help="never show these patients")
    s.add_argument(
        "--crop-3d",
        type=_size,
        default=None,
        help="show the model's centre crop, e.g. 96,96,96 (default: whole volume)",
    )
    s.add_argument(
        "--crop-2d",
        type=_size,
        default=None,
        help="resize 2D images to the model's size, e.g. 224,224",
    )
    s.add_argument("--max-shards", type=int, default=16, help="shards read at most")
    s.set_defaults(handler=_run_shards)

    r = isub.add_parser("run", help="loss, temperature, learning rate, throughput of a run")
    r.add_argument("run_dir", help="run folder (holds logs/version_*/metrics.csv)")
    r.add_argument("--out", default="curves.png", help="PNG to write")
    r.set_defaults(handler=_run_run)


def _run_shards(args: argparse.Namespace) -> int:
    from foundation.inspect.montage import montage

    out = montage(
        args.manifest,
        args.out,
        args.n,
        exclusion_list=args.exclusion_list,
        crop_3d=args.crop_3d,
        crop_2d=args.crop_2d,
        max_shards=args.max_shards,
    )
    print(f"montage written to {out}")
    return 0


def _run_run(args: argparse.Namespace) -> int:
    from foundation.inspect.curves import run_curves

    out = run_curves(args.run_dir, args.out)
    print(f"curves written to {out}")
    return 0
