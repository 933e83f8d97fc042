"""Reading latents back: stream the `latents` table row group by row group.

A trainer with more latents than memory (an SDXL 1024x1024 latent is 128 KiB: 1.5 M images
are ~190 GiB) can shuffle within and across row groups (at most ~32 MiB each) instead of
loading the table. Only ok rows come out, only the columns asked for.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.manifest import Dataset

CONDITIONING = ["original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"]
DEFAULT_COLUMNS = ["image_id", "latent", "shape", "scaling_factor", "shift_factor", *CONDITIONING]


def latent_row_groups(ds: Dataset, model: str | None = None, columns: list[str] = DEFAULT_COLUMNS) -> Iterator[pa.Table]:
    """Ok rows (of one encode `model` if given), one row group at a time, in write order."""
    wanted = list(dict.fromkeys([*columns, "status", "model"]))
    for part in ds.parts("latents"):
        shard = pq.ParquetFile(part)
        for group in range(shard.num_row_groups):
            table = shard.read_row_group(group, columns=[c for c in wanted if c in shard.schema_arrow.names])
            keep = pc.equal(table["status"], "ok")
            if model is not None:
                keep = pc.and_(keep, pc.equal(table["model"], model))
            table = table.filter(keep).select([c for c in columns if c in table.column_names])
            if table.num_rows:
                yield table


def latent_array(blob: bytes, shape) -> np.ndarray:
    """The stored float16 [C, H, W] latent, before scaling (a read-only view of the bytes)."""
    return np.frombuffer(blob, dtype=np.float16).reshape(tuple(shape))
