"""Runs stages over their input and writes their tables: the one executor every command uses.

`run(ds, stages, engine=...)` is the entry point: ingest, hash, buckets, score, caption and
encode all come through it, in-process (`local`, below) or on Ray Data (`ray`, in
`pipelines/ray_executor.py`); the engine is chosen here and nowhere else. Both engines
share `pipelines/rows.py` (CPU: decode once, prepare every stage's input; model: one batch,
failures isolated per row), so they write the same rows; progress, part writing and the
summary are this module's, once.

Rows to do are the input rows with no output row for the stage's `model_key`: rerunning a
killed command finishes the rest and nothing is done twice. The work is claimed a unit at a
time (pipelines/work.py), so two runs of a stage on one dataset share it, and a run that
was killed never blocks the next. The local engine runs the pass in a process it watches
(pipelines/supervise.py), so a file that crashes the decoder becomes a `worker_died` row and
the run goes on; the Ray engine retries what a dead worker held in smaller and smaller
batches (pipelines/ray_executor.py). Several stages can run as one
pass (the scoring pass: CLIP, a tagger, OWLv2): each input row is read and decoded once,
at the largest size any of them needs, and handed to every stage that still has to do it;
each stage writes its own table and resumes on its own `model_key`.
"""
from __future__ import annotations

import itertools
import os
import pickle
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate.claims import Owner
from curate.images import decode_threads, quick_gil_handoffs
from curate.pipelines.rows import decode_need, prepare_row, regroup, setup_stages
from curate.pipelines.stage import Stage
from curate.pipelines.supervise import Died, Journal, Prober, Suspects, supervise
from curate.pipelines.work import Held, Unit, Work, as_rows, batched, source_of
from curate.progress import progress_bar, warn
from curate.store import Dataset, DatasetError, PartWriter

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
    held: Counter = field(default_factory=Counter)  # keys left to other runs that hold them, by run
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())

    def as_dict(self) -> dict:
        rate = self.done / self.seconds if self.seconds else 0.0
        return {"stage": self.stage, "model": self.model, "todo": self.todo, "ok": self.ok,
                "errors": dict(self.errors), **self.counts, "held_elsewhere": sum(self.held.values()),
                "seconds": round(self.seconds, 2),
                "images_per_s": round(rate, 2)}

    def report(self) -> dict:
        """The summary as people read it: one line a figure, errors by code."""
        rows = {"model": self.model, "todo": self.todo, "ok": self.ok}
        rows |= {f"error: {code}": n for code, n in sorted(self.errors.items())}
        rows |= dict(self.counts)
        rows |= {f"left to the run that holds them: {holder}": n for holder, n in self.held.items()}
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
    work = Work(ds, stages)
    if stages[0].source is None:  # it makes its own input: every row it yields is to do
        todo, total = None, None
    else:
        todo = work.todo(where, ids)
        total = len(set().union(*todo))
    summaries = [Summary(s.table, s.model_key(), todo=len(t) if t is not None else 0)
                 for s, t in zip(stages, todo or [None])]
    if total is None or total:
        label = ", ".join(f"{s.table} [{s.model_key()}]" for s in stages)
        with progress_bar(label, total, enabled=show_progress) as advance, ds.owner() as owner:
            work.owner = owner.id
            tally = Tally(stages, summaries, advance, total)
            if engine == "ray":
                from curate.pipelines.ray_executor import run_ray

                _write(ds, stages, run_ray(work, todo, ray_address, tally), tally, owner)
            elif _can_fork():
                journal = Journal(decode_threads())
                supervise(lambda relay, suspects: _local(work, todo, relay, owner, journal, suspects), tally, journal)
            else:
                _local(work, todo, tally, owner, None, Suspects())
    for stage, summary in zip(stages, summaries):
        summary.seconds = time.perf_counter() - started
        if stage.source is None:
            summary.todo = summary.done
    return summaries


def _can_fork() -> bool:
    """Whether the pass can run in a forked process: not where there is no fork, nor where
    this process has used CUDA already (a fork could not use it; commands never do that)."""
    torch = sys.modules.get("torch")
    return hasattr(os, "fork") and not (torch is not None and torch.cuda.is_initialized())


class Tally:
    """A pass's reckoning where the command runs: the progress bar, warnings, and each stage's
    Summary, counted from the rows written (the local engine's pass process relays its calls)."""

    def __init__(self, stages: list[Stage], summaries: list[Summary], advance, total: int | None):
        self.stages, self.summaries, self.advance, self.total = stages, summaries, advance, total
        self.shown = 0
        self.rows_written = 0

    def passed(self, n: int) -> None:
        if self.total is not None:  # rows done again after a restart do not push the bar past the end
            n = max(0, min(n, self.total - self.shown))
        self.shown += n
        self.advance(n)

    def written(self, k: int, ok: int, errors: dict, counts: dict) -> None:
        summary = self.summaries[k]
        summary.ok += ok
        summary.errors.update(errors)
        summary.counts.update(counts)
        self.rows_written += ok + sum(errors.values())

    def held(self, k: int, n: int, holder: str) -> None:
        self.summaries[k].held[holder] += n

    def poison(self, source: str, why: str) -> None:
        warn(f"{source}: {why}; it gets a worker_died row, and the run goes on")

    def finished(self, states: list[dict]) -> None:
        """The stages as the pass left them (their settings and counters; not their weights)."""
        for stage, state in zip(self.stages, states):
            stage.__dict__.update(state)

    def restarted(self, why: str) -> None:
        warn(f"the pass process died ({why}); it starts again and goes on from where it stopped")


def _write(ds: Dataset, stages: list[Stage], results: Iterable[list[tuple[int, pa.Table]]], tally,
           owner: Owner) -> None:
    """Commit and write each stage's rows as they come; the tally counts what is written."""
    def guard():
        if not owner.fresh():  # paused past the claims' lifetime: another run may be doing this work now
            raise DatasetError("this run lost its claims on the work (it was stopped or could not record that it "
                               "lives for minutes); run the command again to go on")

    def counted(k: int, table: str, rows: pa.Table) -> tuple[int, int, dict, dict]:
        """What rows stage k writes to a table hold, noted as they are added (a part streams to
        disk: its rows are not kept); ok rows and errors are counted of the stage's own table."""
        counts = stages[k].counts(table, rows)
        if table != stages[k].table:
            return k, 0, {}, counts
        status = rows.column("status")
        errors = pc.value_counts(rows.column("error").filter(pc.not_equal(status, "ok"))).to_pylist()
        return k, pc.sum(pc.equal(status, "ok")).as_py() or 0, {e["values"]: e["counts"] for e in errors}, counts

    def written(notes: list[tuple[int, int, dict, dict]]) -> None:
        for note in notes:
            tally.written(*note)

    passed: set = set()  # keys any stage has done, for the progress bar
    with ExitStack() as stack:
        writers: dict[str, PartWriter] = {}

        def write(k: int, table: str, rows: pa.Table) -> None:
            if table not in writers:  # one for each table written (ingest's commit adds imported captions)
                writers[table] = stack.enter_context(PartWriter(ds, table, before=guard, written=written))
            writers[table].add(rows, lambda part_rows: counted(k, table, part_rows))

        for batch in results:
            for k, table in batch:
                keys = table.column(stages[k].key).to_pylist()
                if len(stages) == 1:
                    tally.passed(len(keys))
                else:  # an image counts once, whichever stage does it first
                    new = set(keys) - passed
                    passed |= new
                    tally.passed(len(new))
                committed = stages[k].commit(table)
                if isinstance(committed, dict):  # its own rows and other tables' rows
                    table = committed.pop(stages[k].table)
                    for other, rows in committed.items():
                        write(k, other, rows)
                else:
                    table = committed
                write(k, stages[k].table, table)


# ---- the local engine ----------------------------------------------------------------
def _local(work: Work, todo: list[set] | None, tally, owner: Owner, journal: Journal | None,
           suspects: Suspects) -> None:
    """The pass in this process: claimed rows, decoded on threads (ahead of the models),
    the models on this thread, parts written as they fill."""
    stages = work.stages
    batch_size = max(s.batch_size for s in stages)
    prober = Prober(stages) if suspects.prepare else None  # now, before this process has threads
    batches = _claimed_rows(work, work.plan(todo), tally, batch_size)
    _write(work.ds, stages, _prepared_and_processed(work, batches, tally, journal, suspects, prober), tally, owner)
    tally.finished([_portable(s.__getstate__()) for s in stages])


def _portable(state: dict) -> dict:
    """The values of a stage's state that can go to the command's process (a pickle through
    the relay): settings and counters, not a function made in the pass (encode's VAE check)."""
    out = {}
    for name, value in state.items():
        try:
            pickle.dumps(value)
        except Exception:  # pickling fails in many ways (AttributeError, TypeError, PicklingError)
            continue
        out[name] = value
    return out


def _claimed_rows(work: Work, units: Iterable[Unit], tally, batch_size: int) -> Iterator[list[dict]]:
    """The rows of the units this run claims, in lists of batch_size. A unit another run holds
    is tried once more at the end, then left to it (and counted as held)."""
    held: list[tuple[Unit, Held]] = []

    def rows_of(unit: Unit, later: list) -> Iterator[dict]:
        mine, others = work.claim(unit)
        later += [(unit, h) for h in others]
        if unit.rows is not None:
            yield from work.rows(unit, mine)
        else:
            for batch in work.read(unit, mine, batch_size):
                yield from as_rows(batch)

    yield from batched(itertools.chain.from_iterable(rows_of(u, held) for u in units), batch_size)
    again = [Unit(u.name, [u.keys[k] if k == h.stage else set() for k in range(len(u.keys))], u.part,
                  u.row_groups, u.rows) for u, h in held]
    still: list[tuple[Unit, Held]] = []
    yield from batched(itertools.chain.from_iterable(rows_of(u, still) for u in again), batch_size)
    for _, h in still:
        tally.held(h.stage, h.keys, h.holder)


def _prepared_and_processed(work: Work, batches: Iterable[list[dict]], tally, journal: Journal | None,
                            suspects: Suspects, prober: Prober | None):
    """Decode threads prepare rows (ahead of the models); the models run on this thread. The
    journal says what each thread holds; suspects of an earlier crash are prepared alone."""
    stages, key = work.stages, work.stages[0].key

    def prepare(row: dict) -> list[dict | None]:
        k = row[key]
        if k in suspects.dead or k in suspects.prepare:
            try:
                if k in suspects.dead:
                    raise Died(suspects.dead[k])
                return prober.probe(row)
            except Died as e:
                source = source_of(work.ds, stages[0], k)
                tally.poison(source, str(e))
                died = {"_error": "worker_died", "_message": str(e) if source == k else f"{e} (source: {source})"}
                wanted = row.get("_todo", range(len(stages)))
                return [dict(died) if s in wanted else None for s in range(len(stages))]
        if journal is None:
            return prepare_row(stages, row)
        journal.hold(k)
        try:
            return prepare_row(stages, row)
        finally:
            journal.free()

    watch = journal.model if journal is not None else None
    if decode_need(stages) is None and all(s.source is not None for s in stages):
        # Nothing to decode (sizes, embeddings): preparing is cheaper than handing rows to threads.
        prepared = (([r[key] for r in rows], [prepare(r) for r in rows]) for rows in batches)
        setup_stages(stages)
        yield from regroup(stages, prepared, watch, suspects.alone)
        return
    with ThreadPoolExecutor(decode_threads()) as pool, quick_gil_handoffs():
        submitted = (([r[key] for r in rows], [pool.submit(prepare, r) for r in rows]) for rows in batches)
        # Decoding starts while the models load, then stays PREFETCH batches ahead of them.
        pending = deque(itertools.islice(submitted, PREFETCH + 1))
        setup_stages(stages)

        def in_order():
            while pending:
                keys, futures = pending.popleft()
                pending.extend(itertools.islice(submitted, 1))
                yield keys, [f.result() for f in futures]

        yield from regroup(stages, in_order(), watch, suspects.alone)
