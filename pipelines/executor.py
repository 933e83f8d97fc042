"""Runs stages over their input and writes their tables: the one executor every command uses.

`run(ds, stages, engine=...)` is the entry point: ingest, hash, buckets, score, caption and
encode all come through it, in-process (`local`, below) or on Ray Data (`ray`, in
`pipelines/ray_executor.py`); the engine is chosen here and nowhere else. Both engines
share `pipelines/rows.py` (CPU: decode once, prepare every stage's input; model: one batch,
failures isolated per row), so they write the same rows; progress, part writing and the
summary are this module's, once.

Rows to do are the input rows with no output row for the stage's `model_key`: rerunning a
killed command finishes the rest and nothing is done twice. Several stages can run as one
pass (the scoring pass: CLIP, a tagger, OWLv2): each input row is read and decoded once,
at the largest size any of them needs, and handed to every stage that still has to do it;
each stage writes its own table and resumes on its own `model_key`.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa

from curate.images import decode_threads, quick_gil_handoffs
from curate.pipelines.rows import decode_need, input_rows, prepare_row, regroup, setup_stages, todo_ids
from curate.pipelines.stage import Stage
from curate.progress import progress_bar
from curate.store import Dataset, PartWriter

ENGINES = ("local", "ray")
PREFETCH = 2  # input batches decoded ahead of the models (memory: 3 batches of prepared rows)


@dataclass
class Summary:
    """What every command reports: rows to do, done ok, errors by code, and extra counts."""

    stage: str
    model: str
    todo: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)  # a stage's own (ingest: duplicates)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())

    def as_dict(self) -> dict:
        rate = self.done / self.seconds if self.seconds else 0.0
        return {"stage": self.stage, "model": self.model, "todo": self.todo, "ok": self.ok,
                "errors": dict(self.errors), **self.counts, "seconds": round(self.seconds, 2),
                "images_per_s": round(rate, 2)}

    def report(self) -> dict:
        """The summary as people read it: one line a figure, errors by code."""
        rows = {"model": self.model, "todo": self.todo, "ok": self.ok}
        rows |= {f"error: {code}": n for code, n in sorted(self.errors.items())}
        rows |= dict(self.counts)
        return rows | {"seconds": round(self.seconds, 2), "per second": round(self.done / self.seconds, 1)
                       if self.seconds else 0.0}


# ---- the entry point -----------------------------------------------------------------
def run(ds: Dataset, stages: list[Stage] | Stage, *, engine: str = "local", where: str | None = None,
        ids: list[str] | None = None, ray_address: str | None = None, show_progress: bool = True) -> list[Summary]:
    """Run the stages as one pass over their input; one Summary per stage.

    The images wanted are `ids`, or else the manifest's (filtered by `where`); each stage does
    those it has no row for yet. A source stage (ingest) makes its own input instead."""
    stages = [stages] if isinstance(stages, Stage) else stages
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
    if len({s.source for s in stages}) > 1:
        raise ValueError("stages in one pass must read the same source table")
    started = time.perf_counter()
    if stages[0].source is None:  # it makes its own input: every row it yields is to do
        todo: list[set[str] | None] = [None]
        everything: list[str] | None = None
    else:
        todo = [set(todo_ids(ds, s, where=where, wanted=ids)) for s in stages]
        everything = sorted(set().union(*todo))
    summaries = [Summary(s.table, s.model_key(), todo=len(t) if t is not None else 0) for s, t in zip(stages, todo)]
    if everything is None or everything:
        if engine == "local":
            results = _local(ds, stages, todo, everything)
        else:
            from curate.pipelines.ray_executor import run_ray

            results = run_ray(ds, stages, todo, everything, ray_address)
        _write(ds, stages, results, summaries, None if everything is None else len(everything), show_progress)
    for stage, summary in zip(stages, summaries):
        summary.seconds = time.perf_counter() - started
        if stage.source is None:
            summary.todo = summary.done
    return summaries


def _write(ds: Dataset, stages: list[Stage], results: Iterable[list[tuple[int, pa.Table]]], summaries: list[Summary],
           total: int | None, show_progress: bool) -> None:
    """Commit and write each stage's rows as they come, counting them; one row per key and run."""
    label = ", ".join(f"{s.table} [{s.model_key()}]" for s in stages)
    # Input rows of the images table without their bytes include a duplicate's other sources:
    # the first row of an image stands. (With bytes, only the row that holds them is read.)
    repeats = stages[0].source == "images" and not any("bytes" in s.columns for s in stages)
    written: list[set] = [set() for _ in stages]
    passed: set = set()  # keys any stage has done, for the progress bar
    with progress_bar(label, total, enabled=show_progress) as advance, ExitStack() as stack:
        writers = {s.table: stack.enter_context(PartWriter(ds, s.table)) for s in stages}

        def write(table: str, rows: pa.Table) -> None:
            if table not in writers:  # a table a stage's commit adds rows to (ingest: imported captions)
                writers[table] = stack.enter_context(PartWriter(ds, table))
            writers[table].add(rows)

        for batch in results:
            for k, table in batch:
                keys = table.column(stages[k].key).to_pylist()
                if repeats:
                    table, keys = _first_rows(table, keys, written[k])
                if len(stages) == 1:
                    advance(len(keys))
                else:  # an image counts once, whichever stage does it first
                    new = set(keys) - passed
                    passed |= new
                    advance(len(new))
                committed = stages[k].commit(table)
                if isinstance(committed, dict):  # its own rows and other tables' rows
                    table = committed.pop(stages[k].table)
                    for other, rows in committed.items():
                        write(other, rows)
                else:
                    table = committed
                write(stages[k].table, table)
                status = table.column("status").to_pylist()
                summaries[k].ok += status.count("ok")
                summaries[k].errors.update(e for st, e in zip(status, table.column("error").to_pylist()) if st != "ok")
    for stage, summary in zip(stages, summaries):
        summary.counts.update(stage.counts())


def _first_rows(table: pa.Table, keys: list, written: set) -> tuple[pa.Table, list]:
    """The rows whose key this run has not written yet (the first of each key)."""
    first = []
    for key in keys:
        first.append(key not in written)
        written.add(key)
    if all(first):
        return table, keys
    return table.filter(pa.array(first)), [key for key, f in zip(keys, first) if f]


# ---- the local engine ----------------------------------------------------------------
def _local(ds: Dataset, stages: list[Stage], todo: list, everything: list[str] | None):
    """Decode threads prepare rows (ahead of the models); the models run on this thread."""
    batches = input_rows(ds, stages, everything)
    if decode_need(stages) is None and all(s.source is not None for s in stages):
        # Nothing to decode (sizes, embeddings): preparing is cheaper than handing rows to threads.
        prepared = (([r[stages[0].key] for r in rows], [prepare_row(stages, r, todo) for r in rows])
                    for rows in batches)
        setup_stages(stages)
        yield from regroup(stages, prepared)
        return
    with ThreadPoolExecutor(decode_threads()) as pool, quick_gil_handoffs():
        submitted = (([r[stages[0].key] for r in rows], [pool.submit(prepare_row, stages, r, todo) for r in rows])
                     for rows in batches)
        # Decoding starts while the models load, then stays PREFETCH batches ahead of them.
        pending = deque(itertools.islice(submitted, PREFETCH + 1))
        setup_stages(stages)

        def in_order():
            while pending:
                keys, futures = pending.popleft()
                pending.extend(itertools.islice(submitted, 1))
                yield keys, [f.result() for f in futures]

        yield from regroup(stages, in_order())
