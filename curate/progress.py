"""Progress bars and end-of-run summaries, so people see what a long command is doing."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(n); a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def print_summary(title: str, rows: dict) -> None:
    """A two-column table at the end of a run."""
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    console.print(table)
