"""What people see: progress bars and notes on stderr, a command's report on stdout.

A command's report (end-of-run summaries, `info`, `train --dry-run`) goes to stdout, so it
can be piped or saved; progress bars, warnings and log lines go to stderr. The libraries
that load weights draw bars of their own ("Loading weights", "Fetching files"): `quiet_loaders`
turns those off, so ours are the only ones (the `datasets` library's too).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)  # progress, notes, warnings, errors
report = Console()  # a command's results


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


def warn(message: str) -> None:
    """A warning on stderr, one line."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def print_summary(title: str, rows: dict, aside: bool = False) -> None:
    """A two-column table at the end of a run, on stdout; `aside`: on stderr, when stdout
    carries the command's data in a machine format (csv, json) that it must not break."""
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    (console if aside else report).print(table)


def quiet_loaders() -> None:
    """No progress bars from huggingface_hub, transformers or diffusers while they load weights.
    Set through the environment too, so Ray workers and child processes inherit it."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # datasets' own, when an ingest loads one
    os.environ["TRANSFORMERS_VERBOSITY"] = os.environ.get("TRANSFORMERS_VERBOSITY", "error")
    os.environ["DIFFUSERS_VERBOSITY"] = os.environ.get("DIFFUSERS_VERBOSITY", "error")
    for name in ("huggingface_hub.utils", "transformers.utils.logging", "diffusers.utils.logging"):
        module = sys.modules.get(name)  # already imported: tell it directly as well
        if module is not None:
            (module.disable_progress_bars() if hasattr(module, "disable_progress_bars")
             else module.disable_progress_bar())
