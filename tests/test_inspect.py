"""`foundation inspect`: display orientation, sample choice, montage and curves PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_cluster import tiny_dataset, tiny_run  # noqa: F401
from PIL import Image

from foundation.inspect import cli as inspect_cli
from foundation.inspect.curves import read_csv_curves, run_curves
from foundation.inspect.montage import choose_samples, display_planes, montage


def marker_volume() -> np.ndarray:
    """A RAS (X, Y, Z) volume with one bright voxel at patient right, anterior, superior."""
    vol = np.zeros((10, 12, 14), dtype=np.float32)
    vol[:, :, :] = 0.0
    vol[8, 10, 12] = 1.0  # high X = right, high Y = anterior, high Z = superior
    return vol


def bright_at(image: np.ndarray) -> tuple[int, int]:
    r, c = np.unravel_index(np.argmax(image), image.shape)
    return int(r), int(c)


def test_display_planes_follow_radiological_convention():
    vol = marker_volume()
    # put the marker in each middle plane in turn
    axial_vol = vol.copy()
    axial_vol[8, 10, 7] = 1.0
    axial = display_planes(axial_vol, (1.0, 2.0, 3.0))[0]
    assert axial.title == "axial" and axial.image.shape == (12, 10)  # rows Y, cols X
    r, c = bright_at(axial.image)
    assert r < 6 and c < 5  # anterior up, patient right on image left
    assert axial.aspect == pytest.approx(2.0) and axial.edges == ("R", "L", "A", "P")

    coronal_vol = np.zeros_like(vol)
    coronal_vol[8, 6, 12] = 1.0
    coronal = display_planes(coronal_vol, (1.0, 2.0, 3.0))[1]
    assert coronal.image.shape == (14, 10)  # rows Z, cols X
    r, c = bright_at(coronal.image)
    assert r < 7 and c < 5  # superior up, patient right on image left
    assert coronal.aspect == pytest.approx(3.0)

    sagittal_vol = np.zeros_like(vol)
    sagittal_vol[5, 10, 12] = 1.0
    sagittal = display_planes(sagittal_vol, (1.0, 2.0, 3.0))[2]
    assert sagittal.image.shape == (14, 12)  # rows Z, cols Y
    r, c = bright_at(sagittal.image)
    assert r < 7 and c < 6  # superior up, anterior on image left
    assert sagittal.aspect == pytest.approx(1.5)


def test_choose_samples_is_balanced_and_skips_excluded(tiny_dataset):  # noqa: F811
    samples = choose_samples(tiny_dataset.manifest, 3)
    assert len(samples) == 3
    assert len({s.meta["modality"] for s in samples}) >= 2  # not the first 3 CTs
    assert all(s.image.size > 0 for s in samples)
    everyone = {s.meta["patient"] for s in choose_samples(tiny_dataset.manifest, 100)}
    excluded = frozenset(sorted(everyone)[:1])
    kept = choose_samples(tiny_dataset.manifest, 100, excluded=excluded)
    assert kept and not {s.meta["patient"] for s in kept} & excluded


def test_inspect_shards_writes_the_montage(tiny_dataset, tmp_path, capsys):  # noqa: F811
    import argparse

    parser = argparse.ArgumentParser()
    inspect_cli.add_parsers(parser.add_subparsers(dest="command"))
    out = tmp_path / "montage.png"
    args = parser.parse_args(
        [
            "inspect",
            "shards",
            str(tiny_dataset.manifest),
            "--out",
            str(out),
            "--n",
            "4",
            "--crop-3d",
            "32,32,32",
        ]
    )
    assert args.handler(args) == 0
    with Image.open(out) as im:
        # 13 x (2.9 per row) inches at 80 dpi, one row per sample
        assert im.size == (1040, round(2.9 * 4 * 80))
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # something was drawn
    assert "montage written" in capsys.readouterr().out


def test_montage_size_follows_n(tiny_dataset, tmp_path):  # noqa: F811
    out = montage(tiny_dataset.manifest, tmp_path / "m.png", n=2)
    with Image.open(out) as im:
        assert im.size == (1040, round(2.9 * 2 * 80))


def test_inspect_run_draws_the_curves(tiny_run, tmp_path):  # noqa: F811
    curves = read_csv_curves(tiny_run)
    for name in ("train/loss", "train/temperature", "train/lr", "train/samples_per_s"):
        assert name in curves.series, sorted(curves.series)
    assert [s for s, _ in curves.series["train/loss"]] == list(range(6))
    out = run_curves(tiny_run, tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.size == (880, 560)  # 11 x 7 inches at 80 dpi


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "lr-AdamW"])
        w.writeheader()
        w.writerows(rows)


def test_curves_stitch_requeued_attempts(tmp_path):
    run = tmp_path / "run"
    write_metrics(
        run / "logs" / "version_0" / "metrics.csv",
        [{"epoch": 0, "step": s, "train/loss": 5 - s} for s in range(5)],
    )
    # resumed from the step-3 checkpoint: steps 3 and 4 are trained (and logged) again
    write_metrics(
        run / "logs" / "version_1" / "metrics.csv",
        [{"epoch": 0, "step": s, "train/loss": 10 + s} for s in range(3, 7)]
        + [{"step": 3, "lr-AdamW": 0.5}],
    )
    curves = read_csv_curves(run)
    assert curves.series["train/loss"] == [
        (0, 5),
        (1, 4),
        (2, 3),
        (3, 13),
        (4, 14),
        (5, 15),
        (6, 16),
    ]
    assert curves.series["lr-AdamW"] == [(3, 0.5)]
    assert curves.attempt_starts == [3]
    out = run_curves(run, tmp_path / "c.png")  # no train/lr: falls back to the lr monitor
    assert out.is_file()


def test_inspect_run_without_logs_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        run_curves(tmp_path / "empty", tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        run_curves(tmp_path / "missing", tmp_path / "c.png")


def test_montage_of_a_manifest_without_shards_fails_clearly(tmp_path, tiny_dataset):  # noqa: F811
    doc = json.loads(Path(tiny_dataset.manifest).read_text(encoding="utf-8"))
    doc["shard_root"] = str(tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(Exception, match=r"nowhere|not found|missing"):
        montage(bad, tmp_path / "m.png", n=2)
