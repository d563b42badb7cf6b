"""How long the reports of a dataset are in tokens, and how many a token budget would cut.

Radiology reports are long (a French CT report with its header easily passes 150 WordPiece
tokens) and the text tower reads at most ``data.max_report_tokens`` of them: whatever lies past
the budget, often the conclusion, is silently dropped by truncation. The tokenizer stage
measures the lengths once, with the tokenizer it just trained, and saves their percentiles
beside it (``report_lengths.json``); the data module reads them back and warns when its budget
cuts a noticeable share of the reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FILE = "report_lengths.json"
BUDGETS = (128, 256, 512)  # the budgets the summary reports (the configs' usual choices)
WARN_FRACTION = 0.05  # a budget that cuts more reports than this is worth a warning


def token_lengths(reports: Iterable[str], tokenizer: Any, batch: int = 1024) -> np.ndarray:
    """Tokens per report as the text tower sees them (special tokens included), ``(n,)``."""
    out: list[int] = []
    chunk: list[str] = []
    for text in reports:
        chunk.append(text)
        if len(chunk) == batch:
            out += [len(ids) for ids in tokenizer(chunk, verbose=False)["input_ids"]]
            chunk = []
    if chunk:
        out += [len(ids) for ids in tokenizer(chunk, verbose=False)["input_ids"]]
    return np.asarray(out, dtype=np.int64)


def summarise(lengths: np.ndarray, budgets: Sequence[int] = BUDGETS) -> dict[str, Any]:
    """Percentiles 0..100 of ``lengths`` and the share of reports longer than each budget."""
    if not len(lengths):
        raise ValueError("no report to measure")
    return {
        "reports": len(lengths),
        "percentiles": [int(v) for v in np.percentile(lengths, np.arange(101), method="lower")],
        "truncated": {str(b): round(float(np.mean(lengths > b)), 4) for b in budgets},
    }


def save(stats: dict[str, Any], tokenizer_dir: str | Path) -> Path:
    path = Path(tokenizer_dir) / FILE
    path.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return path


def load(tokenizer_dir: str | Path) -> dict[str, Any] | None:
    """The saved figures, or None for a tokenizer trained before they were measured."""
    path = Path(tokenizer_dir) / FILE
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        if len(stats["percentiles"]) != 101:
            raise ValueError("needs 101 percentiles")
        return stats
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable report lengths (%s); not checking the token budget", path, err)
        return None


def share_over(stats: dict[str, Any], budget: int) -> float:
    """Share of the measured reports longer than ``budget`` tokens: exact for the budgets
    measured, else to about 1% from the percentiles."""
    exact = stats.get("truncated", {}).get(str(budget))
    if exact is not None:
        return float(exact)
    p = np.asarray(stats["percentiles"])
    return float(np.mean(p[1:] > budget))  # 100 equal slices of the length distribution


def budget_warning(tokenizer_dir: str | Path, budget: int) -> str | None:
    """A warning when ``budget`` tokens cut more than ``WARN_FRACTION`` of the whole reports
    measured at tokenizer training, else None (also when nothing was measured)."""
    stats = load(tokenizer_dir)
    if stats is None:
        return None
    share = share_over(stats, budget)
    if share <= WARN_FRACTION:
        return None
    p = stats["percentiles"]
    return (
        f"max_report_tokens={budget} cuts about {share:.0%} of this dataset's reports (tokens per "
        f"report: median {p[50]}, p90 {p[90]}, max {p[100]}; {Path(tokenizer_dir) / FILE}); "
        "raise data.max_report_tokens or read only data.report_sections"
    )
