"""A montage of shard samples as the model sees them: catch preprocessing mistakes at a glance.

For each chosen sample, one row: 3D volumes show their middle axial, coronal and sagittal
slices, 2D images the image, all through the evaluation transform (the CT window the model
sees, [0, 1] -> black..white), with modality, body part, spacing, shape, intensity figures and
the start of the scrubbed report. Flipped axes show as upside-down anatomy, a wrong window as
a white or black image, an empty crop as a flat panel.

Display convention (radiological), from the RAS array ``(X, Y, Z)`` whose indices increase
towards patient Right, Anterior, Superior:

- axial ``vol[:, :, z]``: anterior up, patient right on image left (seen from the feet);
- coronal ``vol[:, y, :]``: superior up, patient right on image left (seen from the front);
- sagittal ``vol[x, :, :]``: superior up, anterior on image left.

Each is ``plane.T[::-1, ::-1]``: rows run along the second array axis reversed (anterior or
superior first), columns along the first reversed (right, or anterior, first).
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundation.inspect.figure import save_figure
from foundation.sample import Sample
from foundation.shards.manifest import Manifest
from foundation.shards.reader import decode_meta, decode_report, iter_shard, load_image

PLANES_3D = ("axial", "coronal", "sagittal")


@dataclass
class Panel:
    """One image to draw: ``image`` (rows, cols) in [0, 1], ``aspect`` = row / column spacing."""

    title: str
    image: np.ndarray
    aspect: float
    edges: tuple[str, str, str, str] = ("", "", "", "")  # patient side at left, right, top, bottom


def display_planes(volume: np.ndarray, spacing: Sequence[float]) -> list[Panel]:
    """Middle axial, coronal and sagittal slices of a RAS ``(X, Y, Z)`` volume, display-ready."""
    if volume.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) volume, got shape {volume.shape}")
    sx, sy, sz = (float(s) for s in spacing)
    x, y, z = (n // 2 for n in volume.shape)
    return [
        Panel("axial", volume[:, :, z].T[::-1, ::-1], sy / sx, ("R", "L", "A", "P")),
        Panel("coronal", volume[:, y, :].T[::-1, ::-1], sz / sx, ("R", "L", "S", "I")),
        Panel("sagittal", volume[x, :, :].T[::-1, ::-1], sz / sy, ("A", "P", "S", "I")),
    ]


def model_view(sample: Sample, crop: Sequence[int] | None = None) -> np.ndarray:
    """The sample through the evaluation transform (first channel): ``(X, Y, Z)`` or ``(H, W)``
    float32 in [0, 1]. ``crop`` is the model's input size; None keeps the stored size."""
    from foundation.data.transforms import eval_transform

    dims = sample.image.ndim
    size = tuple(int(s) for s in crop) if crop else tuple(sample.image.shape)
    return eval_transform(dims, size)(sample.image, sample.meta)[0].numpy()


def _round_robin_quota(manifest: Manifest, n: int) -> int:
    groups = {(m, d) for s in manifest.shards for m in s.modalities for d in s.dims}
    return max(1, math.ceil(n / max(1, len(groups))))


def _spread(items: list, k: int) -> list:
    """``k`` items evenly spaced through ``items`` (all of them when there are fewer)."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def choose_samples(
    manifest: Manifest | str | Path,
    n: int = 12,
    *,
    excluded: frozenset[str] = frozenset(),
    max_shards: int = 16,
) -> list[Sample]:
    """Up to ``n`` decoded samples, balanced over (modality, dims), read from at most
    ``max_shards`` shards spread through the dataset; excluded patients are never shown.
    Only the chosen samples' images are decoded."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    paths = _spread(manifest.shard_paths(), max_shards)
    quota = _round_robin_quota(manifest, n)
    taken: dict[str, Sample] = {}
    for strict in (True, False):  # first balanced, then fill up with whatever is left
        per_group: Counter = Counter()
        for s in taken.values():
            per_group[(s.meta.get("modality"), s.meta.get("dims"))] += 1
        for path, raw in _raw_samples(paths):
            if len(taken) >= n:
                break
            meta = decode_meta(raw, path.name)
            group = (meta.get("modality"), meta.get("dims"))
            if raw["__key__"] in taken or meta.get("patient") in excluded:
                continue
            if strict and per_group[group] >= quota:
                continue
            per_group[group] += 1
            image = load_image(raw, path.name)
            taken[raw["__key__"]] = Sample(raw["__key__"], image, meta, decode_report(raw))
        if len(taken) >= n:
            break
    return list(taken.values())


def _raw_samples(paths: list[Path]) -> Iterator[tuple[Path, dict]]:
    for path in paths:
        for raw in iter_shard(str(path)):
            yield path, raw


def _caption(sample: Sample, view: np.ndarray, report_chars: int) -> str:
    m = sample.meta
    spacing = " x ".join(f"{float(s):.3g}" for s in m.get("spacing", []))
    shape = " x ".join(str(s) for s in sample.image.shape)
    report = " ".join(sample.report.split())
    report = (report[:report_chars] + "...") if len(report) > report_chars else report
    lines = [
        f"{m.get('modality', '?')} {m.get('body_part') or ''}  {sample.image.ndim}D  {sample.key}",
        f"shape {shape}  spacing {spacing} mm  {sample.image.dtype}",
        f"model view {' x '.join(map(str, view.shape))}: mean {view.mean():.2f}, "
        f"{(view <= 0).mean():.0%} at 0, {(view >= 1).mean():.0%} at 1",
        "",
        *textwrap.wrap(report or "(no report)", 56),
    ]
    return "\n".join(lines)


def _edge_labels(ax, edges: tuple[str, str, str, str]) -> None:
    spots = (
        (0.02, 0.5, "left", "center"),
        (0.98, 0.5, "right", "center"),
        (0.5, 0.98, "center", "top"),
        (0.5, 0.02, "center", "bottom"),
    )
    for label, (x, y, ha, va) in zip(edges, spots, strict=True):
        if label:
            ax.text(x, y, label, color="yellow", fontsize=7, ha=ha, va=va, transform=ax.transAxes)


def render_montage(
    samples: Sequence[Sample],
    out: str | Path,
    *,
    crop_3d: Sequence[int] | None = None,
    crop_2d: Sequence[int] | None = None,
    report_chars: int = 300,
    title: str | None = None,
) -> Path:
    """Draw one row per sample (3 planes or one image + caption) into a PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("no samples to draw")
    rows = len(samples)
    fig, axes = plt.subplots(
        rows,
        4,
        figsize=(13, 2.9 * rows),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1, 1, 1.5]},
    )
    for r, sample in enumerate(samples):
        view = model_view(sample, crop_3d if sample.image.ndim == 3 else crop_2d)
        if view.ndim == 3:
            panels = display_planes(view, sample.meta.get("spacing", (1, 1, 1)))
        else:
            sr, sc = (float(s) for s in sample.meta.get("spacing", (1, 1)))
            panels = [Panel("image", view, sr / sc)]
        for c in range(3):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(panels):
                p = panels[c]
                ax.imshow(
                    p.image,
                    cmap="gray",
                    vmin=0.0,
                    vmax=1.0,
                    aspect=p.aspect,
                    interpolation="nearest",
                )
                ax.set_title(p.title, fontsize=8)
                _edge_labels(ax, p.edges)
            else:
                ax.axis("off")
        text_ax = axes[r, 3]
        text_ax.axis("off")
        text_ax.text(
            0.0,
            1.0,
            _caption(sample, view, report_chars),
            va="top",
            ha="left",
            fontsize=7.5,
            family="monospace",
            transform=text_ax.transAxes,
        )
    return save_figure(fig, out, title)


def montage(
    manifest: str | Path,
    out: str | Path,
    n: int = 12,
    *,
    exclusion_list: str | Path | None = None,
    crop_3d: Sequence[int] | None = None,
    crop_2d: Sequence[int] | None = None,
    max_shards: int = 16,
) -> Path:
    """``foundation inspect shards``: choose ``n`` samples of a dataset and draw them."""
    excluded: frozenset[str] = frozenset()
    if exclusion_list:
        from foundation.privacy.exclusion import ExclusionList

        excluded = ExclusionList.load(exclusion_list).pseudonyms
    m = Manifest.load(manifest)
    samples = choose_samples(m, n, excluded=excluded, max_shards=max_shards)
    title = f"{m.dataset} v{m.version}: {len(samples)} of {m.num_samples} samples (model view)"
    return render_montage(samples, out, crop_3d=crop_3d, crop_2d=crop_2d, title=title)
