"""Evaluation reports: a Markdown table, the same numbers as JSON, and PNG plots.

``results.md`` puts the pretrained encoder next to a random initialisation of the same
architecture for each biomarker (headline metric with its bootstrap interval), then every
metric. Plots: predicted vs true scatter for regression, ROC curves for binary tasks, one
figure per task with both encoders. Only pseudonymous aggregates and values are written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from foundation.evaluation.metrics import LOWER_IS_BETTER, roc_curve, task_metrics

INITS: tuple[tuple[str, str], ...] = (("pretrained", "pretrained"), ("random_init", "random init"))


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    if ci and all(c is not None and not math.isnan(c) for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def results_markdown(summary: dict[str, dict[str, Any]], title: str = "Biomarker probes") -> str:
    """The Markdown report: headline table, then all metrics per task."""
    modes = sorted({r.get("evaluation") or "patient-level test split" for r in summary.values()})
    lines = [
        f"# {title}",
        "",
        f"Evaluation: {'; '.join(modes)}. 95% percentile bootstrap intervals in brackets (patients resampled).",
        "Mean predictor: the mean (or class shares) of the targets each fold was fitted on, "
        "the floor a head must beat.",
        "",
        "| task | metric | n evaluated | pretrained [CI] | random init [CI] | mean predictor [CI] |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for name, r in summary.items():
        arrow = "lower is better" if r["metric"] in LOWER_IS_BETTER else "higher is better"
        lines.append(
            f"| {name} | {r['metric']} ({arrow}) | {r.get('n_test', '')} | "
            f"{_fmt(r.get('pretrained'), r.get('pretrained_ci'))} | "
            f"{_fmt(r.get('random_init'), r.get('random_init_ci'))} | "
            f"{_fmt(r.get('baseline'), r.get('baseline_ci'))} |"
        )
    for name, r in summary.items():
        lines += ["", f"## {name} ({r['type']})", ""]
        lines += [
            "| metric | pretrained | random init | mean predictor |",
            "| --- | --- | --- | --- |",
        ]
        for metric in task_metrics(r["type"], r.get("target_transform")):
            cells = []
            for init in (*(i for i, _ in INITS), "baseline"):
                m = (r.get("metrics") or {}).get(init, {}).get(metric)
                cells.append(_fmt(m["value"], m["ci"]) if m else "n/a")
            lines.append(f"| {metric} | {' | '.join(cells)} |")
        if r["type"] in ("regression", "binary"):
            lines += ["", f"![{name}]({name}.png)"]
    return "\n".join(lines) + "\n"


def json_clean(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: strict JSON has neither."""
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_task(
    name: str, task_type: str, preds: dict[str, dict], path: Path, log_scale: bool = False
) -> Path | None:
    """Scatter (regression) or ROC (binary) of both encoders; None for other task types.

    ``log_scale``: symmetric-log axes for heavy-tailed targets (calcium scores).
    """
    if task_type not in ("regression", "binary"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in INITS if k in preds]
    if task_type == "regression":
        fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4.4), squeeze=False)
        for ax, (init, label) in zip(axes[0], present, strict=True):
            y, p = (
                np.asarray(preds[init]["y_true"], float),
                np.asarray(preds[init]["y_pred"], float),
            )
            lo = float(min(y.min(), p.min())) if len(y) else 0.0
            hi = float(max(y.max(), p.max())) if len(y) else 1.0
            ax.plot([lo, hi], [lo, hi], color="0.6", linestyle="--", linewidth=1, label="y = x")
            ax.scatter(y, p, s=22, alpha=0.75, edgecolor="none")
            mae = float(np.mean(np.abs(p - y))) if len(y) else float("nan")
            ax.set_title(f"{label} (MAE {mae:.3g}, n={len(y)})")
            ax.set_xlabel(f"true {name}")
            ax.set_ylabel(f"predicted {name}")
            ax.legend(loc="upper left", frameon=False)
            ax.grid(alpha=0.3)
            if log_scale:
                ax.set_xscale("symlog", linthresh=1.0)
                ax.set_yscale("symlog", linthresh=1.0)
    else:
        from foundation.evaluation.metrics import binary_auroc

        fig, ax = plt.subplots(figsize=(5, 4.6))
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
        for init, label in present:
            y, p = np.asarray(preds[init]["y_true"]), np.asarray(preds[init]["y_pred"], float)
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr = roc_curve(y, p)
            style = "-" if init == "pretrained" else (0, (4, 2))  # visible when curves overlap
            ax.plot(
                fpr,
                tpr,
                linestyle=style,
                linewidth=2,
                label=f"{label} (AUROC {binary_auroc(y, p):.3f})",
            )
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{name}: ROC on held-out patients")
        ax.legend(loc="lower right", frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    summary: dict[str, dict[str, Any]],
    predictions: dict[str, dict[str, dict]],
    out_dir: str | Path,
    title: str = "Biomarker probes",
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and ``<task>.png``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(results_markdown(summary, title), encoding="utf-8")
    paths["json"].write_text(json.dumps(json_clean(summary), indent=2) + "\n", encoding="utf-8")
    for name, r in summary.items():
        log = r.get("target_transform") == "log1p"
        png = plot_task(name, r["type"], predictions.get(name, {}), out / f"{name}.png", log)
        if png is not None:
            paths[f"plot:{name}"] = png
    return paths
