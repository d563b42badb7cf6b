"""Saving the project's matplotlib figures (montages, curves) the same way."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or in CI
import matplotlib.pyplot as plt


def save_figure(fig, out: str | Path, title: str | None = None, dpi: int = 80) -> Path:
    """Title, tight layout, write ``out`` (folders created), close the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
