"""`curate train --dry-run`: what the batches and prompts will look like, without a model."""
from __future__ import annotations

import numpy as np

from curate.progress import print_summary, progress_bar, report
from curate.store import Dataset
from curate.trainer.config import TrainConfig
from curate.trainer.data import TrainData, dry_run_report
from curate.trainer.model import pipeline_tokenizer
from curate.trainer.rows import load_rows, split_rows


def dry_run(ds: Dataset, base: str, config: TrainConfig, epochs: int = 1, show_progress: bool = True) -> dict:
    tokenizer = pipeline_tokenizer(base)
    train_rows, val_rows = split_rows(load_rows(ds, config), config)
    data = TrainData(train_rows, config, tokenizer)
    data.require_batches()
    with progress_bar("prompts", epochs * len(train_rows), enabled=show_progress) as advance:
        result = dry_run_report(data, epochs, advance)
    total = result["batches"]
    buckets = [train_rows.shapes[b] for b in np.unique(train_rows.bucket)]
    section(f"dry run: {len(train_rows)} training rows, {len(val_rows)} held out, {data.batches_per_epoch} batches of "
            f"{config.batch_size} per epoch", {"buckets (C, H, W)": buckets})
    section("padded prompt length per batch (tokens: batches, share)",
            {k: f"{v} ({v / total:.0%})" for k, v in result["padded_lengths"].items()})
    section("tags per tag prompt (count: prompts)", result["tag_counts"])
    report.print("[bold]example prompt per rule[/bold] (each rule alone, then all as configured)")
    for rule, text in result["examples"].items():
        report.print(f"  [cyan]{rule:>16}[/cyan]  {text!r}", highlight=False, soft_wrap=True)
    return result


def section(title: str, rows: dict) -> None:
    report.print(f"[bold]{title}[/bold]", soft_wrap=True)
    print_summary("", rows)
