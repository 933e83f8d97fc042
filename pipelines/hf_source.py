"""Hugging Face datasets as an ingest source: a dataset saved with `save_to_disk`, parquet
files with an image column (what the hub serves, and `Dataset.to_parquet` writes), and a
hub id `hf:ID` (or `hf:DIR`, a dataset folder `datasets.load_dataset` reads), loaded through
the `datasets` library and its own cache (a hub id needs a network the first time).

Every row becomes a candidate named `PATH::SPLIT/ROW` (`PATH::ROW` for a parquet file),
with its caption and tags columns as side values (pipelines/sidecars.py): `--caption-column`
(default `caption` or `text`, whichever is a string column) and `--tags-column` (default
`tags`: a list of strings, or one comma-separated string). The image is the first column
with the `Image` feature (a struct of bytes and path, by its name `image` when the schema
carries no features); its bytes are read by the workers, by row, from the memory-mapped
dataset (or the parquet row group), never all at once on the driver.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.images import ImageError, read_file

HUB_PREFIX = "hf:"
CAPTION_COLUMNS = ("caption", "text")  # the default caption column: the first of these that is a string column
TAGS_COLUMN = "tags"
TEXT_BATCH = 4096


class SourceError(ValueError):
    """A Hugging Face source that cannot be read as asked (no image column, a missing column)."""


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def is_image_parquet(path: str) -> bool:
    """A parquet file that holds images (a column of the `Image` feature)."""
    if not path.lower().endswith(".parquet"):
        return False
    try:
        return _image_column(pq.read_schema(path)) is not None
    except (OSError, pa.ArrowException):
        return False


def is_hf_source(source: str) -> bool:
    return source.startswith(HUB_PREFIX) or (os.path.isdir(source) and is_saved_dataset(source)) or \
        (os.path.isfile(source) and is_image_parquet(source))


def _image_column(schema: pa.Schema) -> str | None:
    """The first column of the `Image` feature (from the schema's Hugging Face metadata), or a
    column named `image` that is stored as one (a struct of bytes and path)."""
    if schema.metadata and b"huggingface" in schema.metadata:
        from datasets import Features, Image  # only here: importing datasets takes a second

        features = Features.from_arrow_schema(schema)
        return next((name for name, f in features.items() if isinstance(f, Image)), None)
    field = schema.field("image") if "image" in schema.names else None
    if field is not None and pa.types.is_struct(field.type) and {"bytes", "path"} <= {f.name for f in field.type}:
        return "image"
    return None


def text_columns(schema: pa.Schema, caption: str | None, tags: str | None, where: str) -> dict[str, str]:
    """{table: column} of the caption and tags columns: the ones asked for (which must
    exist) or the defaults that are there."""
    names = set(schema.names)
    for flag, column in (("--caption-column", caption), ("--tags-column", tags)):
        if column is not None and column not in names:
            raise SourceError(f"{where} has no column {column!r} ({flag}); its columns: {', '.join(schema.names)}")
    if caption is None:
        caption = next((c for c in CAPTION_COLUMNS if c in names and pa.types.is_string(schema.field(c).type)), None)
    if tags is None and TAGS_COLUMN in names:
        tags = TAGS_COLUMN
    return {t: c for t, c in (("captions", caption), ("tags", tags)) if c is not None}


# ---- candidates (driver) ---------------------------------------------------------------
def hf_candidates(source: str, caption: str | None = None, tags: str | None = None) -> Iterator[dict]:
    """A candidate per row of a Hugging Face source, with its text as side values."""
    if source.endswith(".parquet") and os.path.isfile(source):
        yield from _parquet_candidates(os.path.abspath(source), caption, tags)
        return
    spec = _spec(source)
    for split, data in _splits(*spec).items():
        schema = data.features.arrow_schema
        image = _image_column(schema)
        where = f"{source} ({split})"
        if image is None:
            raise SourceError(f"{where} has no image column (an Image feature); its columns: {', '.join(schema.names)}")
        columns = text_columns(schema, caption, tags, where)
        prefix = f"{spec[1] if spec[0] != 'hub' else source}::{split}/"
        if columns:
            batches = data.select_columns(list(columns.values())).with_format("arrow").iter(TEXT_BATCH)
            texts = (values for batch in batches for values in _rows(batch, columns))
        else:  # (a selection of no columns iterates no rows)
            texts = ({} for _ in range(data.num_rows))
        for row, values in enumerate(texts):
            ref = {"kind": spec[0], "spec": spec[1], "split": split, "row": row, "column": image}
            yield _candidate(prefix + str(row), ref, values)


def _parquet_candidates(path: str, caption: str | None, tags: str | None) -> Iterator[dict]:
    file = pq.ParquetFile(path)
    image = _image_column(file.schema_arrow)
    columns = text_columns(file.schema_arrow, caption, tags, path)
    row = 0
    for group in range(file.num_row_groups):
        batch = file.read_row_group(group, columns=list(columns.values()))
        for offset, values in enumerate(_rows(batch, columns)):
            ref = {"kind": "parquet", "spec": path, "group": group, "row": offset, "column": image}
            yield _candidate(f"{path}::{row}", ref, values)
            row += 1


def _rows(batch: pa.Table, columns: dict[str, str]) -> Iterator[dict[str, object]]:
    values = {table: batch.column(column).to_pylist() for table, column in columns.items()}
    for i in range(batch.num_rows):
        yield {table: (columns[table], v[i]) for table, v in values.items()}


def _candidate(source: str, ref: dict, values: dict[str, tuple[str, object]]) -> dict:
    side = [{"ext": "hf", "table": table, "column": column, "value": value, "location": source}
            for table, (column, value) in values.items() if value is not None]
    return {"source": source, "hf": ref, **({"side": side} if side else {})}


def _spec(source: str) -> tuple[str, str]:
    """(kind, spec): ("hub", ID or folder for load_dataset) or ("disk", a save_to_disk folder)."""
    if source.startswith(HUB_PREFIX):
        return "hub", source[len(HUB_PREFIX):]
    return "disk", os.path.abspath(source)


@lru_cache(maxsize=8)
def _splits(kind: str, spec: str) -> dict:
    """{split: Dataset} of a saved dataset or a hub dataset (memory-mapped; loaded once per process)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(spec) if kind == "disk" else datasets.load_dataset(spec)
    except Exception as e:  # the library's errors: no network, no such dataset, a damaged folder
        raise SourceError(f"cannot load the Hugging Face dataset {spec}: {str(e).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {str(loaded.split or "train"): loaded}


# ---- image bytes (workers) -------------------------------------------------------------
def read_image(ref: dict) -> bytes:
    """The image bytes of one row: stored in the dataset, or a file its `path` names."""
    try:
        if ref["kind"] == "parquet":
            value = _row_group(ref["spec"], ref["group"], ref["column"]).column(0)[ref["row"]].as_py()
        else:
            value = _image_rows(ref["kind"], ref["spec"], ref["split"], ref["column"])[ref["row"]].column(0)[0].as_py()
    except (OSError, pa.ArrowException, SourceError) as e:
        raise ImageError("unreadable", f"Hugging Face dataset: {e}") from None
    if not value:
        raise ImageError("empty", "the row has no image")
    if value.get("bytes"):
        return value["bytes"]
    if value.get("path"):
        return read_file(value["path"])
    raise ImageError("empty", "the row's image has neither bytes nor a path")


@lru_cache(maxsize=4)
def _row_group(path: str, group: int, column: str) -> pa.Table:
    """One row group's image column; candidates come in order, so a worker reads each group once."""
    return pq.ParquetFile(path).read_row_group(group, columns=[column])


@lru_cache(maxsize=8)
def _image_rows(kind: str, spec: str, split: str, column: str):
    """A split's image column as rows of Arrow (the undecoded struct), made once per worker."""
    return _splits(kind, spec)[split].select_columns([column]).with_format("arrow")


def release() -> None:
    """Drop the datasets and row groups this process keeps open for reading (after an ingest)."""
    for cached in (_splits, _image_rows, _row_group):
        cached.cache_clear()
