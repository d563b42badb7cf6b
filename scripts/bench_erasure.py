"""Erasing one patient rewrites only the shards that hold them: time vs a full rewrite.

Builds a toy dataset of at least 200 tiny shards (the real ShardWriter and Manifest), erases
one patient with ``apply_erasure`` (journal, verification, new version, cleanup included) and
compares with rewriting every shard of the dataset through the same code path.

    python scripts/bench_erasure.py [--patients 300 1200] [--shard-samples 4] [--out DIR]

With tiny shards the fixed cost (writing the manifest twice, journal, scanning the manifest
folder) is a visible part of the erasure time; with real shards (hundreds of MB) the shard
rewrite dominates. Two dataset sizes show the erasure time barely moves with the dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from foundation.governance.erase import apply_erasure
from foundation.governance.rewrite import rewrite_shard
from foundation.governance.toy import build_toy_dataset
from foundation.privacy.exclusion import ExclusionEntry, ExclusionList
from foundation.shards.manifest import Manifest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, nargs="+", default=[300, 1200])
    ap.add_argument("--shard-samples", type=int, default=4)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_erasure_"))
    for n in args.patients:
        bench(root / f"n{n}", n, args.shard_samples)


def bench(work: Path, patients: int, shard_samples: int) -> None:
    shutil.rmtree(work, ignore_errors=True)

    t0 = time.perf_counter()
    ds = build_toy_dataset(work / "ds", n_patients=patients, shard_max_samples=shard_samples)
    build_s = time.perf_counter() - t0
    m = Manifest.load(ds.manifest)
    if len(m.shards) < 200:
        raise SystemExit(f"only {len(m.shards)} shards: raise --patients")
    target = ds.key.patient(ds.patient_ids[len(ds.patient_ids) // 2])
    holding = [r.path for r in m.shards if target in r.patients]
    before = {r.path: _sha(m.shard_dir / r.path) for r in m.shards if r.path not in holding}

    # full rewrite: every shard through the same copy path (identity), as a naive erasure would
    t0 = time.perf_counter()
    full_dir = work / "full"
    full_dir.mkdir(exist_ok=True)
    for path in m.shard_paths():
        tmp = full_dir / path.name
        shutil.copyfile(path, tmp)  # rewrite_shard writes beside its input
        rewrite_shard(tmp, "rewritten-" + path.name, lambda s: s)
    full_s = time.perf_counter() - t0
    shutil.rmtree(full_dir)

    lst = ExclusionList([ExclusionEntry(target, "erasure", "2025-01-01")], key_id=ds.key.key_id)
    t0 = time.perf_counter()
    out = apply_erasure(ds.manifest, [lst], audit_log=work / "audit.jsonl")
    erase_s = time.perf_counter() - t0

    m2 = Manifest.load(ds.manifest)
    same = all(_sha(m2.shard_dir / p) == d for p, d in before.items())
    print(
        f"dataset: {len(m.shards)} shards, {m.num_samples} samples "
        f"({sum(r.bytes for r in m.shards) / 1e6:.1f} MB), built in {build_s:.1f} s"
    )
    print(
        f"erasure of one patient: {out.shards_rewritten} shards rewritten "
        f"(of {len(holding)} holding them), {out.samples_removed} samples removed, "
        f"{erase_s:.3f} s end to end (journal, verify, new version, cleanup)"
    )
    print(
        f"full rewrite of all {len(m.shards)} shards: {full_s:.3f} s "
        f"({1000 * full_s / len(m.shards):.2f} ms per shard)"
    )
    print(
        f"ratio erasure / full rewrite: {erase_s / full_s:.3f} "
        f"(shards: {out.shards_rewritten / len(m.shards):.3f})"
    )
    print(f"untouched shards byte-identical: {same} ({len(before)} shards)\n")


if __name__ == "__main__":
    main()
