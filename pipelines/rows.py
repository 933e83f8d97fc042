"""What both engines do with a pass's rows: prepare each row (decode once, every stage's
input), and process batches of one key with failures isolated per row. (Which rows:
pipelines/work.py.)

The local engine (pipelines/executor.py) and the Ray engine (pipelines/ray_executor.py)
call these same functions, so they write the same rows.
"""
from __future__ import annotations

import gc
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from curate.devices import limit_threads
from curate.images import ImageError, decode, shrink
from curate.pipelines.stage import Stage
from curate.storage import image_data

Watch = Callable[[list], None]  # told the keys of each batch a model is about to process ([] after)


# ---- preparing rows ------------------------------------------------------------------
def prepare_row(stages: list[Stage], row: dict[str, Any]) -> list[dict | None]:
    """Decode one input row once and prepare it for every stage that has it to do (its
    `_todo`; a source stage's row: all), None for the others; failures become
    `_error`/`_message` for each stage concerned."""
    wanted = row.pop("_todo", None)
    wanted = range(len(stages)) if wanted is None else wanted
    out: list[dict | None] = [None] * len(stages)
    try:
        if "location" in row:  # a referenced image is read at its source
            row["bytes"] = image_data(row)
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


def setup_stages(stages: list[Stage]) -> None:
    """Give each model its threads and load it. What they load lives to the end of the pass:
    frozen, the garbage collector stops rescanning it (hundreds of thousands of objects
    after torch and transformers load, a quarter second a full collection)."""
    for stage in stages:
        if stage.has_model:
            limit_threads(stage.resources.cpus)
        stage.setup()
    gc.freeze()


def process_pass(stages: list[Stage], keys: list[str], prepared: list[list[dict | None]]) -> list[tuple[int, pa.Table]]:
    """Run each stage's model on its share of one batch: (stage index, output rows)."""
    out = []
    for k, stage in enumerate(stages):
        mine_keys, mine = stage_share(k, keys, prepared)
        if mine:
            out.append((k, process_rows(stage, mine_keys, mine)))
    return out


def stage_share(k: int, keys: list[str], prepared: list[list[dict | None]]) -> tuple[list[str], list[dict]]:
    """Stage k's share of a pass batch: the keys and prepared rows it has to do."""
    mine = [(i, p[k]) for i, p in zip(keys, prepared) if p[k] is not None]
    return [i for i, _ in mine], [p for _, p in mine]


def process_rows(stage: Stage, keys: list[str], prepared: list[dict], watch: Watch | None = None) -> pa.Table:
    """Run the model on one batch. A failing batch is retried row by row."""
    tables = []
    failed = [(i, p) for i, p in zip(keys, prepared) if "_error" in p]
    if failed:
        tables.append(stage.rows([i for i, _ in failed], {"_error": [p["_error"] for _, p in failed],
                                                          "_message": [p["_message"] for _, p in failed]}))
    good = [(i, p) for i, p in zip(keys, prepared) if "_error" not in p]
    for group in _by_key(stage, good):
        for start in range(0, len(group), stage.batch_size):
            tables += [stage.rows(group_keys, columns) for group_keys, columns
                       in _process_isolating(stage, group[start:start + stage.batch_size], watch)]
    return pa.concat_tables(tables) if len(tables) != 1 else tables[0]


def _by_key(stage: Stage, items: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """Split a batch so rows of different `batch_key`s never share a process() call."""
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(stage.batch_key(item[1]), []).append(item)
    return list(groups.values())


class OneKeyBatches:
    """Regroups prepared rows into batches of one `batch_key`, filled across input batches.

    At most the stage's `held_batches` batches' worth of rows wait; past that the fullest
    group goes out partly filled, so memory stays bounded however many keys there are. An
    ordered stage keeps its rows in input order (one group: its rows share any batch).
    """

    def __init__(self, stage: Stage, watch: Watch | None = None, alone: set = frozenset()):
        self.stage, self.watch, self.alone = stage, watch, alone
        self.groups: dict[Any, list[tuple[str, dict]]] = {}
        self.held = 0

    def add(self, keys: list[str], prepared: list[dict]) -> Iterator[pa.Table]:
        if self.stage.ordered:
            yield process_rows(self.stage, keys, prepared, self.watch)
            return
        for item in zip(keys, prepared):
            if item[0] in self.alone:  # suspected of killing the model's process: a batch of its own
                yield process_rows(self.stage, [item[0]], [item[1]], self.watch)
                continue
            key = None if "_error" in item[1] else self.stage.batch_key(item[1])
            group = self.groups.setdefault(key, [])
            group.append(item)
            self.held += 1
            if len(group) >= self.stage.batch_size:
                yield self._emit(key)
            elif self.held > self.stage.held_batches * self.stage.batch_size:
                yield self._emit(max(self.groups, key=lambda k: len(self.groups[k])))

    def flush(self) -> Iterator[pa.Table]:
        for key in list(self.groups):
            yield self._emit(key)

    def _emit(self, key) -> pa.Table:
        group = self.groups.pop(key)
        self.held -= len(group)
        return process_rows(self.stage, [i for i, _ in group], [p for _, p in group], self.watch)


def _process_isolating(stage: Stage, items: list[tuple[str, dict]],
                       watch: Watch | None = None) -> Iterator[tuple[list[str], dict]]:
    """(keys, output columns) for a group; if the batch fails, each row again on its own,
    so the one that broke it becomes an error row and the rest still count."""
    if not items:
        return
    keys = [i for i, _ in items]
    try:
        if watch:
            watch(keys)
        try:
            result = stage.process(_collate(stage.key, keys, [p for _, p in items]))
        finally:
            if watch:
                watch([])
        lengths = {len(v) for v in result.values()}
        if lengths != {len(items)}:
            raise ValueError(f"process returned {lengths} rows for {len(items)} inputs")
    except Exception as e:
        if len(items) == 1:
            yield keys, {"_error": [getattr(e, "code", "process_failed")], "_message": [f"{type(e).__name__}: {e}"]}
            return
        for item in items:
            yield from _process_isolating(stage, [item], watch)
        return
    yield keys, result


def _collate(key: str, keys: list[str], prepared: list[dict]) -> dict[str, Any]:
    batch: dict[str, Any] = {key: keys}
    for name in prepared[0]:
        values = [p[name] for p in prepared]
        if all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
            batch[name] = np.stack(values)
        else:
            batch[name] = values
    return batch


def regroup(stages: list[Stage], prepared_batches: Iterable[tuple[list[str], list]], watch: Watch | None = None,
            alone: set = frozenset()):
    """Hand each stage its share of every pass batch, regrouped into batches of one key
    (keys in `alone` in batches of their own); yield each output batch as [(stage index, rows)]."""
    regroup = [OneKeyBatches(stage, watch, alone) for stage in stages]
    for keys, prepared in prepared_batches:
        for k, batches in enumerate(regroup):
            mine_keys, mine = stage_share(k, keys, prepared)
            if mine:
                yield from ([(k, table)] for table in batches.add(mine_keys, mine))
    for k, batches in enumerate(regroup):
        yield from ([(k, table)] for table in batches.flush())


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[memoryview | None]:
    """A binary column's values as views of Arrow's memory (None for nulls), without a copy."""
    blobs = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offset_buffer, data_buffer = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offset_buffer, width)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = memoryview(data_buffer or b"")
        blobs += [data[offsets[i]:offsets[i + 1]] if valid else None
                  for i, valid in enumerate(chunk.is_valid().to_pylist())]
    return blobs
