"""Training curves of a run folder: loss, temperature, learning rate and throughput.

Reads every Lightning ``CSVLogger`` file under the run (``logs/version_<n>/metrics.csv``, one
per launch or requeue) and stitches them by step: where a resumed attempt re-logs steps that an
earlier one had logged, the later attempt wins. The start of each later attempt is drawn as a
dashed line, so preemptions and resumes are visible. TensorBoard event files are read when no
CSV exists and ``tensorboard`` is importable.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from foundation.inspect.figure import save_figure

# panel title -> metric names drawn in it (the first present ones; ``lr-*`` matched by prefix)
PANELS: dict[str, tuple[str, ...]] = {
    "loss": (
        "train/loss",
        "train/loss_contrastive",
        "train/loss_mim",
        "val/loss_contrastive",
        "val/loss",
    ),
    "temperature": ("train/temperature",),
    "learning rate": ("train/lr", "lr-"),
    "throughput (samples/s)": ("train/samples_per_s",),
}


@dataclass
class RunCurves:
    """Metric name -> sorted ``(step, value)`` pairs, and the first step of each attempt."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    attempt_starts: list[int] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(self.series)


def _version(path: Path) -> tuple[int, str]:
    m = re.search(r"version_(\d+)", str(path))
    return (int(m.group(1)) if m else -1, str(path))


def metrics_files(run_dir: str | Path) -> list[Path]:
    """Every ``metrics.csv`` under the run, in launch order (version number)."""
    return sorted(Path(run_dir).rglob("metrics.csv"), key=_version)


def _rows(path: Path) -> Iterable[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_csv_curves(run_dir: str | Path) -> RunCurves:
    """Stitch the CSV logs of every attempt of a run (later attempts win on shared steps)."""
    files = metrics_files(run_dir)
    by_name: dict[str, dict[int, float]] = {}
    curves = RunCurves(sources=files)
    for path in files:
        first_step: int | None = None
        for row in _rows(path):
            step = _float(row.get("step"))
            if step is None:
                continue
            first_step = int(step) if first_step is None else min(first_step, int(step))
            for name, text in row.items():
                value = _float(text)
                if name in ("step", "epoch") or value is None:
                    continue
                by_name.setdefault(name, {})[int(step)] = value
        if first_step is not None and path is not files[0]:
            curves.attempt_starts.append(first_step)
    curves.series = {n: sorted(v.items()) for n, v in by_name.items()}
    return curves


def read_tensorboard_curves(run_dir: str | Path) -> RunCurves:
    """Scalars of TensorBoard event files under the run (empty without ``tensorboard``)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return RunCurves()
    by_name: dict[str, dict[int, float]] = {}
    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=_version)
    for path in files:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                by_name.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    return RunCurves(series={n: sorted(v.items()) for n, v in by_name.items()}, sources=files)


def read_curves(run_dir: str | Path) -> RunCurves:
    """CSV logs of the run, else its TensorBoard events; FileNotFoundError if neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    curves = read_csv_curves(run_dir)
    if not curves.series:
        curves = read_tensorboard_curves(run_dir)
    if not curves.series:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv (CSVLogger) or TensorBoard events")
    return curves


def _panel_metrics(curves: RunCurves, wanted: tuple[str, ...]) -> list[str]:
    out = []
    for w in wanted:
        if w.endswith("-"):
            out += [n for n in curves.names() if n.startswith(w)]
        elif w in curves.series:
            out.append(w)
    # one lr curve is enough: Lightning's monitor logs one per parameter group
    return out[:1] if wanted and wanted[0] == "train/lr" else out


def plot_curves(curves: RunCurves, out: str | Path, title: str | None = None) -> Path:
    """A 2x2 figure (loss, temperature, learning rate, throughput) saved as PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (panel, wanted) in zip(axes.flat, PANELS.items(), strict=True):
        names = _panel_metrics(curves, wanted)
        for name in names:
            steps, values = zip(*curves.series[name], strict=True)
            ax.plot(steps, values, label=name, lw=1.2, marker="." if len(steps) < 30 else None)
        for start in curves.attempt_starts:
            ax.axvline(start, color="grey", ls="--", lw=0.8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if names:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, out, title)


def run_curves(run_dir: str | Path, out: str | Path) -> Path:
    """``foundation inspect run``: read a run folder's logs and draw its curves."""
    curves = read_curves(run_dir)
    n = len(curves.attempt_starts) + 1
    title = f"{Path(run_dir).name}: {n} attempt{'s' if n > 1 else ''}"
    if curves.attempt_starts:
        title += " (dashed: resumed at step " + ", ".join(map(str, curves.attempt_starts)) + ")"
    return plot_curves(curves, out, title=title)
