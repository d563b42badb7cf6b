"""Progress bars and end-of-job summary tables for long commands (rich).

Bars go to stderr and switch themselves off when stderr is not a terminal (CI logs, SLURM
output files), so logs stay readable; the summary table is always printed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with counts, elapsed and remaining time."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def summary_table(
    title: str,
    rows: Mapping[str, Any] | list[tuple[str, ...]],
    *,
    columns: tuple[str, ...] = ("what", "value"),
) -> Table:
    """A two-or-more column table; ``rows`` is a mapping or a list of tuples."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    items = rows.items() if isinstance(rows, Mapping) else rows
    for row in items:
        table.add_row(*(format_value(v) for v in row))
    return table


def print_summary(
    title: str,
    rows: Mapping[str, Any] | list[tuple[str, ...]],
    *,
    columns: tuple[str, ...] = ("what", "value"),
) -> None:
    """Print ``summary_table`` to stdout."""
    Console().print(summary_table(title, rows, columns=columns))


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, mappings as ``k: v`` lists."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {format_value(v, digits)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)
