"""The stage contract: every command that writes a table is a stage, run by one executor.

A stage maps input rows to rows of its own table:

- `__init__` keeps settings only, so the object pickles to Ray workers.
- `prepare(row)` runs on CPU workers, once per input row: it gets the requested input
  `columns` and, when `decode_min_side` or `decode_long_side` is set, `row["image"]` (a
  curate.images.Decoded whose shorter side is at least `decode_min_side` and longer side
  at least `decode_long_side`: possibly larger, never smaller unless the file is; its
  `pixels()` gives the uint8 array without a copy when the pass resized it). It returns
  model-ready values (numpy arrays of a fixed shape, numbers, strings); uint8 pixels
  rather than floats, when the model can normalise them batched on its device.
- `setup()` loads weights, once per worker, before the first batch.
- `process(batch)` maps a batch (dict of column -> numpy array or list, as `prepare`
  returned them, plus the `key` column) to the stage's output columns, one row per input.
  It may add an `_error` column (an error code or None per row) and `_message`: a row with
  an `_error` code is written as an error row (keeping the other columns it has, e.g. the
  raw output), so one unusable output (an empty caption, a NaN score) does not fail the
  rest of its batch.
- `rows(ids, columns)` turns output columns into the table's rows (by default: the
  bookkeeping columns every stage table has, then the stage's own); `commit(rows)` sees
  them on the driver, in input order for an `ordered` stage, just before they are written;
  it may return {table: rows} to write rows of other tables as well (ingest: the captions
  and tags it imports from side files).

Input: rows of the `source` table still to do (no row for this stage's `model_key` yet),
narrowed by `source_filter()`; or, for a stage whose `source` is None (ingest), the rows
its `inputs(ds)` yields on the driver. `key` names the column that identifies an input row.

`batch_key(prepared)` says which rows may share a `process` call: rows of different keys
never do (e.g. one aspect bucket per batch, so images of one size stack into one tensor).
Prepared rows wait, up to `held_batches` batches' worth, to fill batches of one key.

`resources` says what one model worker uses: CPU threads for the model (both executors
give it that many before `setup()`) and GPUs (a Ray actor asks for them where the cluster
has any). Exceptions in `prepare` or `process` fail that row only: the executor isolates
it and writes an error row for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curate.devices import model_threads
from curate.models.families import family
from curate.schema import SCHEMAS
from curate.store import Dataset, now


@dataclass(frozen=True)
class Resources:
    cpus: int = 1  # threads the model may use in its worker
    gpus: float = 0  # GPUs one model worker needs


def model_resources(device: str | None) -> Resources:
    """A model's resources: half the cores for its threads (the decode threads have the rest)
    and one GPU, unless told to run on the CPU."""
    return Resources(cpus=model_threads(), gpus=0 if device == "cpu" else 1)


class Stage:
    table: str = ""  # the output table (a key of curate.schema.SCHEMAS)
    source: str | None = "images"  # the table whose rows are the input; None: `inputs()` makes them
    key: str = "image_id"  # the input column that names a row (one output row per key and run)
    columns: tuple[str, ...] = ("image_id", "bytes")  # input columns read from `source`
    decode_min_side: int | None = None  # decode the image (shorter side >= this; 0 = full size)
    decode_long_side: int | None = None  # ... and/or longer side >= this (models that pad to a square)
    batch_size: int = 32
    held_batches: int = 4  # batches' worth of prepared rows that may wait to fill batches of one key (on Ray:
    # that a model actor is handed at once)
    ordered: bool = False  # commit() must see rows in input order
    resources: Resources = Resources()

    def model_key(self) -> str:
        """The `model` column: which model and settings produced a row. Resume keys on it."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        """Settings only: attributes named with a leading `_` (weights, the driver's bookkeeping)
        stay where they were made; a Ray worker loads its own."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def inputs(self, ds: Dataset) -> Iterator[dict]:
        """A source stage's input rows (only when `source` is None), every one it would make, in a
        stable order: those its table holds already marked `present: True` (the executor cuts its
        units of work from all of them, so concurrent runs name a unit alike, and does and claims
        the rest; ingest also yields, for files it holds, side files to read again)."""
        raise NotImplementedError

    def setup(self) -> None:
        pass

    @property
    def has_model(self) -> bool:
        """Whether setup() loads something (weights): its batches then go to model workers."""
        return type(self).setup is not Stage.setup

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        return {}

    def source_filter(self) -> pads.Expression:
        return pc.scalar(True)  # every row of `source`

    def done_filter(self) -> pads.Expression:
        """Rows of the stage's own table that count as done (its `model`'s): resume skips them."""
        return pc.field("model") == self.model_key()

    def batch_key(self, prepared: dict[str, Any]) -> Hashable:
        return None  # any rows may share a batch

    def process(self, batch: dict[str, Any]) -> dict[str, list]:
        raise NotImplementedError

    def rows(self, ids: list[str], columns: dict[str, Any]) -> pa.Table:
        """Rows of the stage's table from its output columns, a column at a time: a row whose
        `_error` is set is an error row (keeping whatever else it has), the rest are ok."""
        n = len(ids)
        errors = columns.get("_error")
        if errors is None:
            errors = [None] * n
        schema = SCHEMAS[self.table]
        arrays = {
            "image_id": pa.array(ids, pa.string()),
            "model": pa.repeat(pa.scalar(self.model_key()), n),
            "status": pa.array(["ok" if e is None else "error" for e in errors], pa.string()),
            "error": pa.array(errors, pa.string()),
            "message": pa.array(columns.get("_message", [None] * n), pa.string()),
            "created_at": pa.repeat(pa.scalar(now(), schema.field("created_at").type), n),
        }
        return pa.Table.from_arrays([arrays[f.name] if f.name in arrays
                                     else column_array(columns.get(f.name), f.type, n)
                                     for f in schema], schema=schema)

    def commit(self, rows: pa.Table) -> pa.Table | dict[str, pa.Table]:
        return rows

    def counts(self, table: str, rows: pa.Table) -> dict[str, int]:
        """What rows this stage writes to a table hold beyond ok rows and errors (ingest:
        duplicates, captions imported), for the summary."""
        return {}


def column_array(values, type_: pa.DataType, n: int) -> pa.Array:
    """One output column as Arrow: None (not produced: nulls), a 2-D numpy array for a list
    column (converted without a Python object per number), or anything pa.array takes."""
    if values is None:
        return pa.nulls(n, type_)
    if isinstance(values, np.ndarray) and values.ndim == 2 and pa.types.is_list(type_):
        offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type_.value_type))
    return pa.array(values, type_)


class ModelStage(Stage):
    """A stage around a model adapter (curate.models): the adapter's decode needs, its
    preprocess on CPU workers and its forward on a batch, into the table of its task."""

    TABLES = {"embed": "embeddings", "rank": "quality", "tag": "tags", "watermark": "watermarks",
              "classify": "classifications", "caption": "captions"}

    def __init__(self, adapter, device: str | None = None, batch_size: int | None = None, dtype: str | None = None):
        self.adapter, self.device, self.dtype = adapter, device, dtype
        self.table = self.TABLES[family(adapter.family).task]
        self.decode_min_side, self.decode_long_side = adapter.decode_min_side, adapter.decode_long_side
        self.batch_size = batch_size or adapter.batch_size
        self.resources = model_resources(device)

    def model_key(self) -> str:
        return self.adapter.model_value()

    def setup(self) -> None:
        self.adapter.load(self.device, self.dtype)

    def prepare(self, row):
        return self.adapter.preprocess(row["image"])

    def process(self, batch):
        return self.adapter.forward(batch)
