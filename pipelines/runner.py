"""Runs a stage over the rows still to do, in-process or on Ray Data, and writes parts.

Both engines share `prepare_row` (CPU: decode once, prepare model inputs) and
`process_rows` (model: one batch, failures isolated per image), so they write the same
rows. Rows to do are the input rows with no output row for the stage's `model_key`:
rerunning a killed command finishes the rest and nothing is done twice. The Ray engine
lives in `pipelines/ray_engine.py`.

`run_stages` runs several stages as one pass (the scoring pass: CLIP, a tagger, OWLv2):
each input row is read and decoded once, at the largest size any of them needs, and
handed to every stage that still has to do that image; each stage writes its own table
and resumes on its own `model_key`. `run_stage` is a pass of one stage.
"""
from __future__ import annotations

import gc
import itertools
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curate.images import ImageError, decode, decode_threads, quick_gil_handoffs, shrink
from curate.manifest import Dataset, now
from curate.progress import progress_bar
from curate.schema import SCHEMAS
from pipelines.stage import Stage

# Rows per part: bounds the work lost to a kill (CURATE_PART_ROWS overrides it, e.g. in tests).
PART_ROWS = int(os.environ.get("CURATE_PART_ROWS", "2048"))
PART_SECONDS = 60.0  # and so does time, for slow stages
PART_BYTES = 256 << 20
PREFETCH = 2  # input batches decoded ahead of the models (memory: 3 batches of prepared rows)


@dataclass
class Summary:
    stage: str
    model: str
    todo: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())

    def as_dict(self) -> dict:
        rate = self.done / self.seconds if self.seconds else 0.0
        return {"stage": self.stage, "model": self.model, "todo": self.todo, "ok": self.ok,
                "errors": dict(self.errors), "seconds": round(self.seconds, 2), "images_per_s": round(rate, 2)}


# ---- shared by both engines ----------------------------------------------------------
def prepare_row(stages: list[Stage], row: dict[str, Any], todo: list) -> list[dict | None]:
    """Decode one input row once and prepare it for every stage that has it to do (None
    for the others); failures become `_error`/`_message` for each stage concerned."""
    wanted = [k for k, ids in enumerate(todo) if row["image_id"] in ids]
    out: list[dict | None] = [None] * len(stages)
    try:
        need = decode_need([stages[k] for k in wanted])
        if need is not None:
            row["image"] = decode(row["bytes"], min_side=need[0] or None, long_side=need[1] or None)
            if len(wanted) > 1:  # one resize to what the largest needs, so each stage resizes a small image
                row["image"] = shrink(row["image"], *need)
    except ImageError as e:
        for k in wanted:
            out[k] = {"_error": e.code, "_message": e.message}
        return out
    for k in wanted:
        try:
            out[k] = stages[k].prepare(row)
        except ImageError as e:
            out[k] = {"_error": e.code, "_message": e.message}
        except Exception as e:  # a bug or bad input in one image must not stop the run
            out[k] = {"_error": "prepare_failed", "_message": f"{type(e).__name__}: {e}"}
    return out


def decode_need(stages: list[Stage]) -> tuple[int, int] | None:
    """What one decode must give every stage: None (no decode), or the (shorter side,
    longer side) it needs at least, the largest asked for; (0, 0) is full size."""
    asks = [(s.decode_min_side, s.decode_long_side) for s in stages
            if s.decode_min_side is not None or s.decode_long_side is not None]
    if not asks:
        return None
    if any(0 in ask for ask in asks):
        return 0, 0
    return max(a or 0 for a, _ in asks), max(b or 0 for _, b in asks)


def process_pass(stages: list[Stage], ids: list[str], prepared: list[list[dict | None]]) -> list[tuple[int, pa.Table]]:
    """Run each stage's model on its share of one batch: (stage index, output rows)."""
    out = []
    for k, stage in enumerate(stages):
        mine_ids, mine = _stage_share(k, ids, prepared)
        if mine:
            out.append((k, process_rows(stage, mine_ids, mine)))
    return out


def _stage_share(k: int, ids: list[str], prepared: list[list[dict | None]]) -> tuple[list[str], list[dict]]:
    """Stage k's share of a pass batch: the ids and prepared rows it has to do."""
    mine = [(i, p[k]) for i, p in zip(ids, prepared) if p[k] is not None]
    return [i for i, _ in mine], [p for _, p in mine]


def process_rows(stage: Stage, ids: list[str], prepared: list[dict]) -> pa.Table:
    """Run the model on one batch. A failing batch is retried image by image."""
    tables = []
    failed = [(i, p) for i, p in zip(ids, prepared) if "_error" in p]
    if failed:
        tables.append(output_rows(stage, [i for i, _ in failed], {"_error": [p["_error"] for _, p in failed],
                                                                  "_message": [p["_message"] for _, p in failed]}))
    good = [(i, p) for i, p in zip(ids, prepared) if "_error" not in p]
    for group in _by_key(stage, good):
        tables += [output_rows(stage, group_ids, columns) for group_ids, columns in _process_isolating(stage, group)]
    return pa.concat_tables(tables) if tables else SCHEMAS[stage.table].empty_table()


def output_rows(stage: Stage, ids: list[str], columns: dict[str, Any]) -> pa.Table:
    """Rows of the stage's table from its output columns, a column at a time: a row whose
    `_error` is set is an error row (keeping whatever else it has), the rest are ok."""
    n = len(ids)
    errors = columns.get("_error")
    if errors is None:
        errors = [None] * n
    arrays = {
        "image_id": pa.array(ids, pa.string()),
        "model": pa.repeat(pa.scalar(stage.model_key()), n),
        "status": pa.array(["ok" if e is None else "error" for e in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
        "message": pa.array(columns.get("_message", [None] * n), pa.string()),
        "created_at": pa.repeat(pa.scalar(now(), SCHEMAS[stage.table].field("created_at").type), n),
    }
    schema = SCHEMAS[stage.table]
    return pa.Table.from_arrays([arrays[f.name] if f.name in arrays else column_array(columns.get(f.name), f.type, n)
                                 for f in schema], schema=schema)


def column_array(values, type_: pa.DataType, n: int) -> pa.Array:
    """One output column as Arrow: None (not produced: nulls), a 2-D numpy array for a list
    column (converted without a Python object per number), or anything pa.array takes."""
    if values is None:
        return pa.nulls(n, type_)
    if isinstance(values, np.ndarray) and values.ndim == 2 and pa.types.is_list(type_):
        offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type_.value_type))
    return pa.array(values, type_)


def _by_key(stage: Stage, items: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """Split a batch so rows of different `batch_key`s never share a process() call."""
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(stage.batch_key(item[1]), []).append(item)
    return list(groups.values())


class OneKeyBatches:
    """Regroups prepared rows into batches of one `batch_key`, filled across input batches.

    At most MAX_HELD_BATCHES batches' worth of rows wait; past that the fullest group goes
    out partly filled, so memory stays bounded however many keys there are.
    """

    MAX_HELD_BATCHES = 4

    def __init__(self, stage: Stage):
        self.stage = stage
        self.groups: dict[Any, list[tuple[str, dict]]] = {}
        self.held = 0

    def add(self, ids: list[str], prepared: list[dict]) -> Iterator[pa.Table]:
        for item in zip(ids, prepared):
            key = None if "_error" in item[1] else self.stage.batch_key(item[1])
            group = self.groups.setdefault(key, [])
            group.append(item)
            self.held += 1
            if len(group) >= self.stage.batch_size:
                yield self._emit(key)
            elif self.held > self.MAX_HELD_BATCHES * self.stage.batch_size:
                yield self._emit(max(self.groups, key=lambda k: len(self.groups[k])))

    def flush(self) -> Iterator[pa.Table]:
        for key in list(self.groups):
            yield self._emit(key)

    def _emit(self, key) -> pa.Table:
        group = self.groups.pop(key)
        self.held -= len(group)
        return process_rows(self.stage, [i for i, _ in group], [p for _, p in group])


def _process_isolating(stage: Stage, items: list[tuple[str, dict]]) -> Iterator[tuple[list[str], dict]]:
    """(ids, output columns) for a group; if the batch fails, each image again on its own,
    so the one that broke it becomes an error row and the rest still count."""
    if not items:
        return
    ids = [i for i, _ in items]
    try:
        result = stage.process(_collate(ids, [p for _, p in items]))
        lengths = {len(v) for v in result.values()}
        if lengths != {len(items)}:
            raise ValueError(f"process returned {lengths} rows for {len(items)} inputs")
    except Exception as e:
        if len(items) == 1:
            yield ids, {"_error": [getattr(e, "code", "process_failed")], "_message": [f"{type(e).__name__}: {e}"]}
            return
        for item in items:
            yield from _process_isolating(stage, [item])
        return
    yield ids, result


def _collate(ids: list[str], prepared: list[dict]) -> dict[str, Any]:
    batch: dict[str, Any] = {"image_id": ids}
    for key in prepared[0]:
        values = [p[key] for p in prepared]
        if all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = np.stack(values)
        else:
            batch[key] = values
    return batch


# ---- choosing the input --------------------------------------------------------------
def todo_ids(ds: Dataset, stage: Stage, where: str | None = None, wanted: list[str] | None = None) -> list[str]:
    """Ok images (matching `where`, or of `wanted`) that have no row for this stage's model yet."""
    wanted = ds.select_ids(where) if wanted is None else wanted
    done = ds.read(stage.table, ["image_id"], filter=pc.field("model") == stage.model_key())
    done_ids = set(done.column("image_id").to_pylist())
    return [i for i in wanted if i not in done_ids]


def input_filter(stage: Stage, ids: list[str] | pa.Array) -> pads.Expression:
    """Rows of `stage.source` to feed (all stages of one pass share the first one's source)."""
    expr = pc.field("image_id").isin(pa.array(ids, pa.string()))
    if stage.source == "images":  # one row per image: the first source, which holds the bytes
        expr = expr & (pc.field("status") == "ok") & pc.field("bytes").is_valid()
    return expr & stage.source_filter()


# ---- engines -------------------------------------------------------------------------
def run_stage(ds: Dataset, stage: Stage, **kw) -> Summary:
    return run_stages(ds, [stage], **kw)[0]


def run_stages(
    ds: Dataset,
    stages: list[Stage],
    *,
    engine: str = "local",
    where: str | None = None,
    ray_address: str | None = None,
    show_progress: bool = True,
    ids: list[str] | None = None,
) -> list[Summary]:
    """One pass over the input: every image to do is read and decoded once for all stages.

    The images wanted are `ids`, or else the manifest's (filtered by `where`); each stage
    does those it has no row for yet."""
    if len({s.source for s in stages}) > 1:
        raise ValueError("stages in one pass must read the same source table")
    started = time.perf_counter()
    wanted = ds.select_ids(where) if ids is None else list(ids)
    todo = [todo_ids(ds, s, wanted=wanted) for s in stages]
    summaries = [Summary(s.table, s.model_key(), todo=len(t)) for s, t in zip(stages, todo)]
    everything = sorted(set().union(*todo))
    if everything:
        if engine == "local":
            run = _local
        else:
            from pipelines.ray_engine import run_ray as run
        label = ", ".join(f"{s.table} [{s.model_key()}]" for s in stages)
        writers = {s.table: PartWriter(ds, s.table) for s in stages}
        with progress_bar(label, len(everything), enabled=show_progress) as advance, ExitStack() as stack:
            for w in writers.values():
                stack.enter_context(w)
            seen: set[str] = set()
            for results in run(ds, stages, todo, everything, ray_address):
                for k, table in results:
                    new = set(table.column("image_id").to_pylist()) - seen
                    seen |= new
                    advance(len(new))
                    writers[stages[k].table].add(table)
                    status = table.column("status").to_pylist()
                    summaries[k].ok += status.count("ok")
                    summaries[k].errors.update(e for st, e in zip(status, table.column("error").to_pylist()) if st != "ok")
    for summary in summaries:
        summary.seconds = time.perf_counter() - started
    return summaries


def setup_stages(stages: list[Stage]) -> None:
    """Load every stage's model. What they load lives to the end of the pass: frozen, the
    garbage collector stops rescanning it (hundreds of thousands of objects after torch and
    transformers load, a quarter second a full collection)."""
    for stage in stages:
        stage.setup()
    gc.freeze()


def _local(ds: Dataset, stages: list[Stage], todo: list[list[str]], everything: list[str], ray_address=None):
    todo_sets = [set(t) for t in todo]
    with ThreadPoolExecutor(decode_threads()) as pool, quick_gil_handoffs():
        submitted = (([r["image_id"] for r in rows], [pool.submit(prepare_row, stages, r, todo_sets) for r in rows])
                     for rows in input_rows(ds, stages, everything))
        # Decoding starts while the models load, then stays PREFETCH batches ahead of them.
        pending = deque(itertools.islice(submitted, PREFETCH + 1))
        setup_stages(stages)
        regroup = [OneKeyBatches(stage) for stage in stages]
        while pending:
            ids, futures = pending.popleft()
            pending.extend(itertools.islice(submitted, 1))
            yield from _regrouped(regroup, ids, [f.result() for f in futures])
        for k, batches in enumerate(regroup):
            yield from ([(k, table)] for table in batches.flush())


def _regrouped(regroup: list[OneKeyBatches], ids: list[str], prepared: list[list[dict | None]]):
    """Hand each stage its share of a pass batch; yield each output batch as [(stage index, rows)]."""
    for k, batches in enumerate(regroup):
        mine_ids, mine = _stage_share(k, ids, prepared)
        if mine:
            yield from ([(k, table)] for table in batches.add(mine_ids, mine))


def input_rows(ds: Dataset, stages: list[Stage], ids: list[str]) -> Iterator[list[dict]]:
    """The pass's input rows for `ids`, in lists of the largest batch size of its stages
    (each stage's own batches are regrouped from them)."""
    batch_size = max(s.batch_size for s in stages)
    columns = sorted(set().union(*(s.columns for s in stages)))
    # The filter is read as a column and applied only to batches it drops rows from:
    # Arrow's filter copies every image's bytes even when it keeps them all. One reading
    # thread: the decode threads have the cores, and Arrow's own would compete.
    projection = {c: pc.field(c) for c in columns} | {"_keep": input_filter(stages[0], ids)}
    source = ds.scan(stages[0].source, projection, batch_size=batch_size, use_threads=False, ids=set(ids))
    for table in _rebatch((_kept(b) for b in source), batch_size):
        yield _rows(table)


def _kept(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch's rows whose `_keep` is true, without the column; not copied when all are."""
    keep = batch.column("_keep")
    batch = batch.drop_columns(["_keep"])
    return batch if keep.null_count == 0 and pc.all(keep).as_py() is not False else batch.filter(keep)


def _rows(table: pa.Table) -> list[dict]:
    """Rows as dicts; image bytes as views of Arrow's memory that the decoder reads in
    place. (to_pylist, and even Arrow's scalars, copy each image: about 1 ms for 2 MB.)"""
    if "bytes" not in table.column_names:
        return table.to_pylist()
    rows = table.drop_columns(["bytes"]).to_pylist()
    blobs = []
    for chunk in table.column("bytes").chunks:
        _, offset_buffer, data_buffer = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offset_buffer, width)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = memoryview(data_buffer or b"")
        blobs += [data[offsets[i]:offsets[i + 1]] if valid else None
                  for i, valid in enumerate(chunk.is_valid().to_pylist())]
    for row, blob in zip(rows, blobs):
        row["bytes"] = blob
    return rows


def _rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    buffer: list[pa.RecordBatch] = []
    rows = 0
    for b in batches:
        buffer.append(b)
        rows += b.num_rows
        while rows >= size:
            table = pa.Table.from_batches(buffer)
            yield table.slice(0, size)
            rest = table.slice(size)
            buffer, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(buffer)


class PartWriter:
    """Buffers output rows and writes a part every PART_ROWS rows / PART_SECONDS seconds."""

    def __init__(self, ds: Dataset, table: str):
        self.ds, self.table = ds, table
        self.buffer: list[pa.Table] = []
        self.rows = 0
        self.bytes = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.rows += table.num_rows
        self.bytes += table.nbytes
        if self.rows >= PART_ROWS or self.bytes >= PART_BYTES or time.monotonic() - self.last_flush > PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rows = pa.concat_tables(self.buffer)
            for start in range(0, rows.num_rows, PART_ROWS):  # a model batch can be larger than a part
                self.ds.write_part(self.table, rows.slice(start, PART_ROWS))
        self.buffer, self.rows, self.bytes = [], 0, 0
        self.last_flush = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.flush()  # finished rows are kept even on Ctrl-C
