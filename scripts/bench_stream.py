"""Benchmark the shard stream against MONAI baselines, all measured in the same run.

    python scripts/bench_stream.py            # 256x256x96 int16 CT-like volumes
    python scripts/bench_stream.py --full     # 512x512x160 (the real size of a chest CT)
    python scripts/bench_stream.py --small    # CI: tiny volumes, < 30 s

Figures (printed as ratios against their baselines):
- samples/s of ShardStream (decode + crop + CT window) vs MONAI LoadImaged + Orientationd +
  Spacingd + crop from NIfTI, and vs MONAI PersistentDataset with the same transforms
  (deterministic part cached, second pass);
- bytes per sample: shards vs the PersistentDataset cache vs the NIfTI files;
- streaming read rate (tar iteration + every image read into an array: the reader reads an
  image only when asked) vs ``cat`` of the same shards; the stream itself reads only the crop
  boxes of a local 3D volume (``npy_slab``): its image bytes read per sample, and those bytes
  per second at the measured samples/s, are printed beside (bytes actually read, not stored);
- the exclusion filter's cost with a real list file of 1,000,000 pseudonyms (``save``: JSON
  and sidecar) through the real ``ShardStream`` path: the median samples/s ratio of
  interleaved (no list, list) epochs; the filter stage alone (meta only) and its membership
  checks per sample, as a share of the per-sample pipeline time; the per-epoch fixed cost
  (list load at set-up + the epoch state sent to each worker) as a share of an epoch at the
  issue's scale (``--epoch-samples`` over ``--ranks`` x ``--workers`` workers at this run's
  per-worker samples/s); loading the list from the sidecar and from the JSON alone;
- ``.npy`` vs compressed forms (zlib-1; zstd-1 and zstd-3 when ``zstandard`` is importable) on
  size and decode speed (bytes in memory -> array; ``.npy`` by ``np.load`` and by the reader's
  zero-copy ``decode_npy``).
Everything runs in one process (num_workers=0) so the ratios compare per-core cost.
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from foundation.data.exclusion_filter import exclusion_filter
from foundation.data.stream import ShardStream
from foundation.data.transforms import train_transform
from foundation.sample import Sample, sample_key
from foundation.shards.manifest import Manifest
from foundation.shards.npy_slab import read_stats
from foundation.shards.reader import decode_npy, iter_shard, load_image
from foundation.shards.writer import ShardWriter

REPEATS = 3
PAIRS = 5  # interleaved (no list, list) epochs for the exclusion ratio

try:
    import zstandard
except ImportError:  # optional
    zstandard = None


def ct_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-like int16 volume: air outside a body ellipse, soft tissue, a few bright bones."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    vol = np.full(shape, -1000, dtype=np.int16)
    tissue = rng.normal(40, 30, shape).astype(np.int16)
    vol[body] = tissue[body]
    vol[(x**2 + (y + 0.3) ** 2 < 0.01)] = 900  # spine
    return vol


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def build(root: Path, n: int, shape: tuple[int, int, int], n_patients: int) -> tuple[Path, list]:
    """Shards (already canonical, as ingest writes them) and NIfTI files of the same volumes
    (LPS affine, 0.7x0.7x2.5 mm: the MONAI baseline has orientation and spacing work to do)."""
    rng = np.random.default_rng(0)
    nifti_dir = root / "nifti"
    nifti_dir.mkdir()
    files = []
    with ShardWriter(root / "shards", max_samples=8) as w:
        for i in range(n):
            vol = ct_volume(rng, shape)
            study = f"{i:08x}"
            meta = {
                "patient": f"{i % n_patients:024x}",
                "study": study,
                "modality": "CT",
                "dims": 3,
                "spacing": [0.7, 0.7, 2.5],
                "shape": list(shape),
                "orientation": "RAS",
            }
            w.write(Sample(sample_key(study, 0), vol, meta, "compte rendu"))
            affine = np.diag([-0.7, -0.7, 2.5, 1.0])  # LPS+
            path = nifti_dir / f"{study}.nii.gz"
            nib.save(nib.Nifti1Image(vol[::-1, ::-1], affine), path)
            files.append({"image": str(path)})
    manifest = Manifest(dataset="bench", key_id="k", shards=w.close(), shard_root="shards")
    return manifest.save(root / "bench-v1.json"), files


def monai_transforms(crop: tuple[int, int, int]):
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    deterministic = [
        LoadImaged("image"),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=(0.7, 0.7, 2.5)),  # the stored spacing: resampling cost only
    ]
    random = [
        RandSpatialCropd("image", crop, random_size=False),
        SpatialPadd("image", crop),
        ScaleIntensityRanged("image", -160, 240, 0.0, 1.0, clip=True),
    ]
    return Compose(deterministic + random)


def best(k: int, fn) -> float:
    """Shortest of ``k`` timed runs (the machine may be shared: the minimum is the cost)."""
    return min(timed(fn)[0] for _ in range(k))


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def compression_rows(vol: np.ndarray, reps: int = 5) -> list[tuple[str, str, str]]:
    """Size and decode time (bytes in memory -> array) of ``.npy`` against compressed forms."""
    buf = io.BytesIO()
    np.save(buf, vol)
    raw = buf.getvalue()
    raw_u8 = np.frombuffer(bytearray(raw), dtype=np.uint8)
    t_load = best(reps, lambda: np.load(io.BytesIO(raw)))
    t_view = best(reps, lambda: decode_npy(raw_u8))
    rows = [
        ("bytes/volume .npy", f"{len(raw) / 1e6:.2f} MB", "1.00"),
        ("decode ms .npy, np.load (one copy)", f"{t_load * 1e3:.2f}", "1.00"),
        ("decode ms .npy, decode_npy (view, no copy)", f"{t_view * 1e3:.3f}",
         f"x{t_view / t_load:.3f}"),
    ]  # fmt: skip
    codecs = [("zlib-1", lambda: zlib.compress(raw, 1), zlib.decompress)]
    if zstandard is not None:
        for level in (1, 3):
            cctx = zstandard.ZstdCompressor(level=level)
            codecs.append(
                (
                    f"zstd-{level}",
                    lambda c=cctx: c.compress(raw),
                    zstandard.ZstdDecompressor().decompress,
                )
            )
    else:
        rows.append(("zstd (zstandard)", "not installed", ""))
    for name, pack, unpack in codecs:
        t_pack, packed = timed(pack)
        t_cmp = best(
            reps, lambda u=unpack, p=packed: decode_npy(np.frombuffer(u(p), dtype=np.uint8))
        )
        rows += [
            (f"bytes/volume {name}", f"{len(packed) / 1e6:.2f} MB",
             f"x{len(packed) / len(raw):.2f}"),
            (f"decode ms {name} (+ decode_npy)", f"{t_cmp * 1e3:.1f}",
             f"x{t_cmp / t_load:.1f} of np.load; {len(raw) / t_cmp / 1e6:.0f} MB/s out;"
             f" encode {t_pack * 1e3:.0f} ms"),
        ]  # fmt: skip
    return rows


def make_stream(manifest: Manifest, exclusion: Path | None, crop: tuple[int, ...]) -> ShardStream:
    """The bench's stream: one process, batches of 2 crops, the real exclusion-list loader."""
    return ShardStream(
        manifest, exclusion, transform_3d=train_transform(3, crop), batch_size=2, seed=0,
        rank=0, world_size=1,
    )  # fmt: skip


def exclusion_rows(
    root: Path, manifest: Manifest, crop: tuple[int, ...], args: argparse.Namespace
) -> list[tuple[str, str, str]]:
    """The exclusion list's cost, through the real list file and the real stream path."""
    from foundation.privacy.exclusion import ExclusionEntry, ExclusionList

    n_excl = args.excluded
    big = [f"{i:024x}" for i in range(10**12, 10**12 + n_excl)]  # none of the bench's patients
    lst = ExclusionList(ExclusionEntry(p, "opposition", "2024-01-01") for p in big)
    path = root / "exclusions.json"
    lst.save(path)  # the JSON and its binary sidecar, as `foundation optout import` leaves them
    streams = {"none": make_stream(manifest, None, crop), "list": make_stream(manifest, path, crop)}

    # End to end, interleaved: epoch e of both streams reads the same crops; the order within
    # a pair alternates so that a drift of the machine's load does not favour one side.
    rates: dict[str, list[float]] = {"none": [], "list": []}
    setup: dict[str, list[float]] = {"none": [], "list": []}
    for e in range(PAIRS):
        for name in ("none", "list") if e % 2 == 0 else ("list", "none"):
            s = streams[name]
            setup[name].append(timed(s.set_epoch, e + 1)[0])  # reloads the list
            n = len(s) * 2
            rates[name].append(rate(n, timed(lambda s=s: sum(len(b["key"]) for b in s))[0]))
    ratios = [b / a for a, b in zip(rates["none"], rates["list"], strict=True)]
    r_none = statistics.median(rates["none"])
    per_sample = 1.0 / r_none  # s per sample of the whole pipeline, one core

    # The filter stage alone (tar members + meta.json + the checks, no image read), with the
    # stream's own worker set and with none; and the membership checks alone.
    worker_drop = streams["list"]._state.drop  # what each worker receives for the epoch
    shards = [
        (str(p), r.path) for p, r in zip(manifest.shard_paths(), manifest.shards, strict=True)
    ]

    def filter_pass(s: ShardStream, drop: frozenset[str]) -> int:
        def listed(name: str) -> dict[str, int] | None:  # as the stream's own filter stage
            return None if s._listed is None else s._listed.get(name, {})

        return sum(
            1
            for u, name in shards
            for _ in exclusion_filter(iter_shard(u), name, drop, listed(name), s.stats)
        )

    n = filter_pass(streams["none"], frozenset())
    f_none, f_list = [], []
    for e in range(2 * PAIRS):  # a few ms a pass: the shortest of interleaved passes is its cost
        for none in (True, False) if e % 2 == 0 else (False, True):
            if none:
                f_none.append(timed(filter_pass, streams["none"], frozenset())[0] / n)
            else:
                f_list.append(timed(filter_pass, streams["list"], worker_drop)[0] / n)
    f0, f1 = min(f_none), min(f_list)
    patients = [f"{i % max(2, n // 2):024x}" for i in range(n)] * 2000  # the bench's pseudonyms
    full = frozenset(big)

    def check_s(drop: frozenset[str]) -> float:  # s per membership check
        return best(REPEATS, lambda: sum(p in drop for p in patients)) / len(patients)

    c_full, c_worker = check_s(full), check_s(worker_drop)

    # Per-epoch fixed cost at the scale: each rank's main process loads the list and
    # plans (set-up), then sends every worker the epoch state (pickled under spawn/forkserver;
    # a fork start copies it on write): W x that. An epoch lasts epoch_samples / (R x W x r).
    ranks, workers = args.ranks, args.workers
    t_set = statistics.median(setup["list"])
    t_set0 = statistics.median(setup["none"])
    t_send, blob = timed(pickle.dumps, streams["list"])
    blob0 = pickle.dumps(streams["none"])
    t_old, old = timed(pickle.dumps, full)  # what each worker was sent before: the whole set
    epoch_s = args.epoch_samples / (ranks * workers * r_none)
    fixed = t_set + workers * t_send
    t_json, _ = timed(lambda: ExclusionList.load(path, cache=False))
    t_side, loaded = timed(ExclusionList.load, path)
    assert loaded.version == lst.version and len(loaded.pseudonyms) == n_excl
    scale = (
        f"{args.epoch_samples:,} samples/epoch over {ranks} ranks x {workers} workers"
        f" at {r_none:.1f} samples/s each: epoch {epoch_s:.0f} s"
    )
    return [
        (f"samples/s ShardStream, list of {n_excl:,} (real file)",
         f"{statistics.median(rates['list']):.1f}",
         f"vs {r_none:.1f} with none (medians); ratio within each of {PAIRS} interleaved"
         f" pairs: median x{statistics.median(ratios):.3f}, x{min(ratios):.3f}..x{max(ratios):.3f}"
         " (this machine's noise)"),
        (f"  filter stage alone, meta only, best of {2 * PAIRS} (ms/sample)", f"{f1 * 1e3:.3f}",
         f"vs {f0 * 1e3:.3f} with none: {(f1 - f0) / per_sample:+.2%} of a sample's time"),
        (f"  membership check, the {n_excl:,} set (us/sample)", f"{c_full * 1e6:.3f}",
         f"{c_full / per_sample:.4%} of a sample's time ({per_sample * 1e3:.1f} ms)"),
        (f"  membership check, the workers' set ({len(worker_drop)}) (us/sample)",
         f"{c_worker * 1e6:.3f}", f"{c_worker / per_sample:.4%} of a sample's time"),
        ("  epoch set-up with the list: load + plan (s)", f"{t_set:.2f}",
         f"vs {t_set0:.3f} s with none"),
        ("  epoch state sent to each worker (ms)", f"{t_send * 1e3:.1f}",
         f"{len(blob) / 1e6:.2f} MB ({len(blob0) / 1e6:.2f} MB with none; the whole set"
         f" was {len(old) / 1e6:.0f} MB, {t_old * 1e3:.0f} ms)"),
        ("  per-epoch fixed cost: set-up + W x state (s)", f"{fixed:.2f}",
         f"{fixed / epoch_s:.3%} of an epoch ({scale})"),
        (f"ExclusionList.load {n_excl:,}, sidecar (s)", f"{t_side:.2f}",
         f"JSON only {t_json:.2f} s: sidecar x{t_json / t_side:.1f} faster"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny volumes for CI (< 30 s)")
    ap.add_argument("--full", action="store_true", help="512x512x160 volumes")
    ap.add_argument("--volumes", type=int, default=None)
    ap.add_argument("--excluded", type=int, default=None, help="default 1M (--small: 100k)")
    ap.add_argument("--epoch-samples", type=int, default=420_000, help="issue scale")
    ap.add_argument("--ranks", type=int, default=8, help="issue scale")
    ap.add_argument("--workers", type=int, default=8, help="dataloader workers per rank")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core cost, as in a DataLoader worker
    if args.small:
        shape, crop, n = (64, 64, 24), (32, 32, 16), args.volumes or 16
    elif args.full:
        shape, crop, n = (512, 512, 160), (160, 160, 96), args.volumes or 24
    else:
        shape, crop, n = (256, 256, 96), (128, 128, 64), args.volumes or 32
    if args.excluded is None:
        args.excluded = 100_000 if args.small else 1_000_000
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_build, (manifest_path, files) = timed(build, root, n, shape, max(2, n // 2))
        manifest = Manifest.load(manifest_path)
        print(f"{n} volumes {shape} int16, crop {crop}; built in {t_build:.1f} s")

        # -- ours: decode + crop + window, batches of 2 --------------------------------------
        def ours() -> float:
            """samples/s over the epoch (best of REPEATS passes)."""
            stream = make_stream(manifest, None, crop)
            stream.set_epoch(0)
            samples = len(stream) * 2  # batches of 2, the same count every epoch
            return rate(samples, best(REPEATS, lambda: sum(len(b["key"]) for b in stream)))

        ours()  # warm-up (imports, page cache)
        read_stats.clear()
        r_ours = ours()
        box_bytes = read_stats["bytes"] / (REPEATS * n)  # per sample (REPEATS passes of n)

        # -- MONAI from NIfTI, and PersistentDataset ---------------------------------------
        from monai.data import Dataset, PersistentDataset

        full = monai_transforms(crop)
        ds = Dataset(files, transform=full)
        t_monai = best(REPEATS, lambda: [ds[i] for i in range(len(ds))])
        r_monai = rate(n, t_monai)
        cache = root / "persistent"
        pds = PersistentDataset(files, transform=full, cache_dir=cache)
        t_first, _ = timed(lambda: [pds[i] for i in range(len(pds))])
        t_second = best(REPEATS, lambda: [pds[i] for i in range(len(pds))])
        r_pers = rate(n, t_second)
        rows += [
            ("samples/s ShardStream", f"{r_ours:.1f}", "1.00"),
            ("samples/s MONAI NIfTI Load+Orient+Spacing+crop", f"{r_monai:.1f}",
             f"ours x{r_ours / r_monai:.1f}"),
            ("samples/s MONAI PersistentDataset (cached pass)", f"{r_pers:.1f}",
             f"ours x{r_ours / r_pers:.2f}"),
            ("  PersistentDataset first pass (building cache)", f"{rate(n, t_first):.1f}", ""),
        ]  # fmt: skip

        # -- bytes per sample -------------------------------------------------------------
        shard_bytes = sum(s.bytes for s in manifest.shards) / n
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / n
        nifti_bytes = sum(Path(f["image"]).stat().st_size for f in files) / n
        rows += [
            ("bytes/sample shards (.npy in tar)", f"{shard_bytes / 1e6:.2f} MB", "1.00"),
            ("bytes/sample PersistentDataset cache", f"{cache_bytes / 1e6:.2f} MB",
             f"x{cache_bytes / shard_bytes:.2f}"),
            ("bytes/sample NIfTI .nii.gz", f"{nifti_bytes / 1e6:.2f} MB",
             f"x{nifti_bytes / shard_bytes:.2f}"),
        ]  # fmt: skip

        # -- streaming read vs cat --------------------------------------------------------
        paths = [str(p) for p in manifest.shard_paths()]
        total_bytes = sum(s.bytes for s in manifest.shards)
        t_cat, _ = timed(lambda: subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL))
        t_cat = min(
            t_cat, best(REPEATS, lambda: subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL))
        )

        def read_all(urls: list[str], images: bool = True) -> int:
            return sum(load_image(r).nbytes if images else 0 for u in urls for r in iter_shard(u))

        t_read = best(REPEATS, lambda: read_all(paths))
        t_pipe = best(REPEATS, lambda: read_all([f"pipe:cat {p}" for p in paths]))
        t_meta = best(REPEATS, lambda: read_all(paths, images=False))
        cat_cat = f"cat {' '.join(paths)} | cat > /dev/null"  # what a pipe alone costs
        t_cat_cat = best(REPEATS, lambda: subprocess.run(cat_cat, shell=True, check=True))
        rows += [
            ("read MB/s cat", f"{total_bytes / t_cat / 1e6:.0f}", "1.00"),
            ("read MB/s shard -> arrays (local)", f"{total_bytes / t_read / 1e6:.0f}",
             f"x{t_cat / t_read:.2f}"),
            ("read MB/s cat | cat (a pipe alone)", f"{total_bytes / t_cat_cat / 1e6:.0f}",
             f"x{t_cat / t_cat_cat:.2f}"),
            ("read MB/s shard -> arrays (pipe:cat)", f"{total_bytes / t_pipe / 1e6:.0f}",
             f"x{t_cat / t_pipe:.2f} (x{t_cat_cat / t_pipe:.2f} of cat | cat)"),
            ("  meta/report only, images skipped (local, ms/sample)",
             f"{t_meta / n * 1e3:.3f}", ""),
            ("stream image bytes read/sample (crop boxes)", f"{box_bytes / 1e6:.2f} MB",
             f"x{box_bytes / shard_bytes:.2f} of stored"),
            ("stream image MB/s read at its samples/s", f"{box_bytes * r_ours / 1e6:.0f}",
             f"x{box_bytes * r_ours * t_cat / total_bytes:.2f} of cat (compute-bound)"),
        ]  # fmt: skip

        rows += exclusion_rows(root, manifest, crop, args)

        # -- .npy vs compressed -----------------------------------------------------------
        rows += compression_rows(ct_volume(np.random.default_rng(1), shape))

    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>12}  {ratio}")


if __name__ == "__main__":
    main()
