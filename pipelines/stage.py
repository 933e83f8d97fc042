"""The stage contract.

A stage maps images to rows of its own table:

- `__init__` keeps settings only, so the object pickles to Ray workers.
- `prepare(row)` runs on CPU workers, once per image: it gets the requested input columns
  and, when `decode_min_side` or `decode_long_side` is set, `row["image"]` (a
  curate.images.Decoded whose shorter side is at least `decode_min_side` and longer side
  at least `decode_long_side`: possibly larger, never smaller unless the file is; its
  `pixels()` gives the uint8 array without a copy when the pass resized it). It
  returns model-ready values (numpy arrays of a fixed shape, numbers, strings); uint8
  pixels rather than floats, when the model can normalise them batched on its device.
- `setup()` loads weights, once per worker, before the first batch.
- `process(batch)` maps a batch (dict of column -> numpy array or list, as `prepare`
  returned them, plus `image_id`) to the stage's output columns, one row per input.
  It may add an `_error` column (an error code or None per row) and `_message`: a row
  with an `_error` code is written as an error row (keeping the other columns it has,
  e.g. the raw output), so one unusable output (an empty caption, a NaN score) does not
  fail the rest of its batch.

`source_filter()` narrows the rows of `source` a stage reads (e.g. only the embeddings
of one model); the default keeps them all.

`batch_key(prepared)` says which rows may share a `process` call: rows of different keys
never do (e.g. one aspect bucket per batch, so images of one size stack into one
tensor). The local engine fills each batch with rows of one key.

Exceptions in `prepare` or `process` fail that image only: the runner isolates the
image and writes an error row for it.
"""
from __future__ import annotations

from typing import Any, Hashable

import pyarrow.compute as pc
import pyarrow.dataset as pads


class Stage:
    table: str = ""  # the output table (a key of curate.schema.SCHEMAS)
    source: str = "images"  # the table whose rows are the input
    columns: tuple[str, ...] = ("image_id", "bytes")  # input columns read from `source`
    decode_min_side: int | None = None  # decode the image (shorter side >= this; 0 = full size)
    decode_long_side: int | None = None  # ... and/or longer side >= this (models that pad to a square)
    batch_size: int = 32
    num_gpus: float = 0  # per model actor on Ray

    def model_key(self) -> str:
        """The `model` column: which model and settings produced a row. Resume keys on it."""
        raise NotImplementedError

    def setup(self) -> None:
        pass

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        return {}

    def source_filter(self) -> pads.Expression:
        return pc.scalar(True)  # every row of `source`

    def batch_key(self, prepared: dict[str, Any]) -> Hashable:
        return None  # any rows may share a batch

    def process(self, batch: dict[str, Any]) -> dict[str, list]:
        raise NotImplementedError
