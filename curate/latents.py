"""Reading latents back: stream the `latents` table row group by row group.

A trainer with more latents than memory (an SDXL 1024x1024 latent is 128 KiB: 1.5 M images
are ~190 GiB) can read the small columns of every row once, remember where each latent
lives (part, row group, row), and read latent bytes back one row group at a time (at most
~32 MiB each) when it needs them. Only ok rows come out, only the columns asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.storage import filesystem
from curate.store import Dataset

CONDITIONING = ["original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"]
DEFAULT_COLUMNS = ["image_id", "latent", "shape", "scaling_factor", "shift_factor", *CONDITIONING]


def open_part(part: Path | str) -> pq.ParquetFile:
    """A part, local or in object storage (through the process's one S3 client)."""
    fs, path = filesystem(part)
    return pq.ParquetFile(path, filesystem=fs)


def read_row_group(part: Path | str, group: int, columns: list[str]) -> pa.Table:
    """One stored row group of a latents part, every row (ok or not), the columns the part has."""
    shard = open_part(part)
    return shard.read_row_group(group, columns=[c for c in columns if c in shard.schema_arrow.names])


def latent_row_groups(ds: Dataset, model: str | None = None, columns: list[str] = DEFAULT_COLUMNS,
                      positions: bool = False) -> Iterator[pa.Table]:
    """Ok rows (of one encode `model` if given), one row group at a time, in write order.

    With `positions`, each table also holds `part` (its file), `row_group` and `row` (the index
    in the stored row group), so a reader can keep these instead of the latent and fetch it
    later with read_row_group.
    """
    wanted = list(dict.fromkeys([*columns, "status", "model"]))
    for part in ds.parts("latents"):
        for group in range(open_part(part).num_row_groups):
            table = read_row_group(part, group, wanted)
            if positions:
                table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int32)))
            keep = pc.equal(table["status"], "ok")
            if model is not None:
                keep = pc.and_(keep, pc.equal(table["model"], model))
            table = table.filter(keep).select([c for c in [*columns, *(["row"] if positions else [])]
                                               if c in table.column_names])
            if positions:
                table = (table.append_column("part", pa.array([str(part)] * table.num_rows))
                         .append_column("row_group", pa.array([group] * table.num_rows, pa.int32())))
            if table.num_rows:
                yield table


def latent_array(blob: bytes, shape) -> np.ndarray:
    """The stored float16 [C, H, W] latent, before scaling (a read-only view of the bytes)."""
    return np.frombuffer(blob, dtype=np.float16).reshape(tuple(shape))
