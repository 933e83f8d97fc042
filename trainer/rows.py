"""The rows a run trains on: latent positions and metadata as columns, with the rows' text.

A run over 1.5M images must know every chosen row (its bucket, where its latent lives, its
text) before planning an epoch, but a step only ever looks at a batch of them. So the rows are
kept as columns (numpy arrays, and the text as Arrow arrays), and a Row, the Python object the
batch code reads, is made on access: making 1.35M Rows with their tag lists at the start took
~13 s and ~3.6 KB a row. Whatever is computed over all rows (buckets, row groups, the held-out
split, the prompts' spans) reads the columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from sys import intern
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.latents import CONDITIONING, latent_row_groups
from curate.store import Dataset, DatasetError, where_clause
from curate.trainer.config import TrainConfig

# Everything but the latent: what a run keeps of the latents table
ROW_COLUMNS = ["image_id", "created_at", "shape", "scaling_factor", "shift_factor", "resized_height", "resized_width",
               *CONDITIONING, "flip_crop_left"]
NO_BOXES: tuple = ()  # shared by every row without watermark boxes (most of them)


@dataclass(slots=True)
class Row:
    image_id: str
    shape: tuple[int, int, int]  # of the float16 [C, H, W] latent
    part: str  # where the latent lives: a latents part file, its row group and the row in that group
    row_group: int
    row: int
    scaling_factor: float
    shift_factor: float  # 0 for SD/SDXL VAEs; the UNet sees (latent - shift) * scale
    time_ids: tuple[int, int, int, int, int, int]  # original h, w; crop top, left; target h, w
    resized: tuple[int, int]
    tags: list[str]
    caption: str | None
    rank: int | None
    has_watermark: bool
    boxes: list[dict] | tuple  # NO_BOXES without
    flip_crop_left: int | None  # the mirrored crop's left in the flipped image (encode --flip), else None

    @property
    def bucket(self) -> tuple[int, ...]:
        return self.shape


class TrainRows:
    """Rows in image_id order, as columns. `rows[i]` is a Row, `rows[a:b]` the rows a to b.

    Per row: `bucket` (an index into `shapes`, the distinct latent shapes), `group` (an index
    into `groups`, the distinct (part, row group) pairs holding latents), `row` in its group,
    the scale and shift, the six SDXL time ids, the resized size, the mirrored crop's left (-1
    without one), and `text` (an Arrow table: image_id, tags, caption, rank, has_watermark and
    watermark_boxes)."""

    def __init__(self, text: pa.Table, shapes: list[tuple[int, int, int]], bucket: np.ndarray,
                 groups: list[tuple[str, int]], group: np.ndarray, row: np.ndarray, scale: np.ndarray,
                 time_ids: np.ndarray, resized: np.ndarray, flip_crop_left: np.ndarray):
        self.text, self.shapes, self.bucket, self.groups, self.group = text, shapes, bucket, groups, group
        self.row, self.scale, self.time_ids, self.resized = row, scale, time_ids, resized
        self.flip_crop_left = flip_crop_left

    def __len__(self) -> int:
        return len(self.bucket)

    def __getitem__(self, key: int | slice) -> Row | TrainRows:
        if isinstance(key, slice):  # a view, as numpy's: no column is copied
            if key.step not in (None, 1):
                raise ValueError("TrainRows are sliced into consecutive rows")
            start, stop, _ = key.indices(len(self))
            s = slice(start, max(start, stop))
            return TrainRows(self.text.slice(s.start, s.stop - s.start), self.shapes, self.bucket[s], self.groups,
                             self.group[s], self.row[s], self.scale[s], self.time_ids[s], self.resized[s],
                             self.flip_crop_left[s])
        return self.make([key])[0]

    def __iter__(self) -> Iterator[Row]:
        for start in range(0, len(self), 10_000):
            yield from self.make(range(start, min(start + 10_000, len(self))))

    def texts(self, indices) -> list[tuple]:
        """(image_id, tags, caption, rank, has_watermark) of these rows: what a prompt is made of."""
        text = self.text.take(pa.array(indices, pa.int64()))
        return list(zip(text["image_id"].to_pylist(), tag_lists(text["tags"]), text["caption"].to_pylist(),
                        text["rank"].to_pylist(), text["has_watermark"].to_pylist()))

    def make(self, indices) -> list[Row]:
        """Rows `indices`, as Row objects."""
        indices = np.asarray(list(indices), np.int64)
        text = self.text.take(pa.array(indices))
        located = [self.groups[g] for g in self.group[indices].tolist()]
        flips = self.flip_crop_left[indices].tolist()
        return [Row(image_id, self.shapes[bucket], part, row_group, row, scale, shift, tuple(time_ids),
                    tuple(resized), tags, caption, rank, marked, boxes, None if flip < 0 else flip)
                for image_id, bucket, (part, row_group), row, (scale, shift), time_ids, resized, tags, caption, rank,
                marked, boxes, flip in zip(
                    text["image_id"].to_pylist(), self.bucket[indices].tolist(), located, self.row[indices].tolist(),
                    self.scale[indices].tolist(), self.time_ids[indices].tolist(), self.resized[indices].tolist(),
                    tag_lists(text["tags"]), text["caption"].to_pylist(), text["rank"].to_pylist(),
                    text["has_watermark"].to_pylist(), box_lists(text["watermark_boxes"]), flips)]


def load_rows(ds: Dataset, config: TrainConfig) -> TrainRows:
    """The ok latent rows (latest per image) of images chosen by rank and `where`, with their text.

    Only the small columns are read; a row points at its latent for LatentCache to read later.
    The choice and the latest row of each image are made in Arrow.
    """
    conditions = ["has_latent"]
    if not config.keep_rank_0:
        conditions.append("(rank IS NULL OR rank > 0)")
    try:
        if config.where:
            conditions.append(where_clause(config.where))
        # from the stage tables' join kept in the cache folder: a resumed run starts in seconds
        text = ds.query_manifest("SELECT image_id, tags, caption, rank, coalesce(has_watermark, false) AS "
                                 "has_watermark, watermark_boxes FROM manifest WHERE " + " AND ".join(conditions)
                                 + " ORDER BY image_id", cached=True)
    except DatasetError as e:
        raise ValueError(f"bad where {config.where!r}: {e}") from None
    groups = list(latent_row_groups(ds, config.latents_model, ROW_COLUMNS, positions=True))
    if groups:
        latents = pa.concat_tables(groups)
        latents = latents.append_column("write_order", pa.array(np.arange(latents.num_rows)))
        latents = latents.filter(pc.is_in(latents["image_id"], value_set=text["image_id"]))
    if not groups or not latents.num_rows:
        raise ValueError("no rows to train on: no ok latents among the chosen images "
                         "(run `curate encode`, check --where)")
    if pc.count_distinct(latents["image_id"]).as_py() < latents.num_rows:
        # An image encoded again: its latest row (write order: of two rows created at once, the later)
        latents = latents.sort_by([("image_id", "ascending"), ("created_at", "ascending"),
                                   ("write_order", "ascending")])
        ids = latents["image_id"]
        last = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)).to_numpy(zero_copy_only=False)
        latents = latents.filter(pa.array(np.append(last, True)))
    else:
        latents = latents.sort_by("image_id")
    if not text["image_id"].equals(latents["image_id"]):  # some chosen images lack a latent of latents_model
        text = text.take(pc.index_in(latents["image_id"], value_set=text["image_id"]))

    def numbers(*names: str) -> np.ndarray:
        return np.stack([pc.fill_null(latents[n], 0).to_numpy() for n in names], axis=1).astype(np.int64)

    # each shape once, shared by its bucket's rows: [C, H, W] as one number, to find them fast
    dims = pc.list_flatten(latents["shape"]).to_numpy().reshape(-1, 3).astype(np.int64)
    keys, bucket = np.unique((dims[:, 0] << 42) | (dims[:, 1] << 21) | dims[:, 2], return_inverse=True)
    shapes = [(int(k >> 42), int(k >> 21 & (1 << 21) - 1), int(k & (1 << 21) - 1)) for k in keys]
    # each (part, row group) once
    parts = latents["part"].combine_chunks().dictionary_encode()
    names = [intern(p) for p in parts.dictionary.to_pylist()]
    pairs = (parts.indices.to_numpy().astype(np.int64) << 32) | latents["row_group"].to_numpy().astype(np.int64)
    keys, group = np.unique(pairs, return_inverse=True)
    located = [(names[k >> 32], int(k & 0xFFFFFFFF)) for k in keys.tolist()]
    scale = np.stack([latents["scaling_factor"].to_numpy(), pc.fill_null(latents["shift_factor"], 0.0).to_numpy()],
                     axis=1).astype(np.float64)
    flip_crop_left = pc.fill_null(latents["flip_crop_left"], -1).to_numpy().astype(np.int64)
    return TrainRows(text, shapes, bucket.ravel().astype(np.int32), located, group.ravel().astype(np.int32),
                     latents["row"].to_numpy().astype(np.int32), scale,
                     numbers(*CONDITIONING),  # diffusers' order: sdxl_time_ids
                     numbers("resized_height", "resized_width"), flip_crop_left)


def split_rows(rows: TrainRows, config: TrainConfig) -> tuple[TrainRows, TrainRows]:
    """(train, validation): the lowest image_ids are held out."""
    n_val = min(config.validation_max, int(len(rows) * config.validation_fraction))
    return rows[n_val:], rows[:n_val]


def box_lists(boxes: pa.ChunkedArray) -> list:
    """Each row's watermark boxes; only rows that have some are converted to Python values."""
    out = [NO_BOXES] * len(boxes)
    some = np.flatnonzero(pc.fill_null(pc.list_value_length(boxes), 0).to_numpy(zero_copy_only=False) > 0)
    for i, value in zip(some.tolist(), boxes.take(some).to_pylist()):
        out[i] = value
    return out


def tag_lists(tags: pa.ChunkedArray | pa.Array) -> list[list[str]]:
    """Each row's tags as a list of strings, one string object per tag name (a tagger names
    ~10,000 tags: rows share them, and a span of rows pickled for a prompt worker sends each
    once). Read through the column's dictionary of names."""
    lists = tags.combine_chunks() if isinstance(tags, pa.ChunkedArray) else tags
    if len(lists) == 0:
        return []
    encoded = pc.list_flatten(lists).dictionary_encode()
    names = np.array([intern(t) for t in encoded.dictionary.to_pylist()] + [""], dtype=object)
    values = names[encoded.indices.fill_null(len(names) - 1).to_numpy()].tolist()
    offsets = (lists.offsets.to_numpy() - lists.offsets[0].as_py()).tolist()
    # a null list (no tagger row) has the offsets of an empty one
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
