"""The sharded layouts of `curate export` (the file layouts and the helpers they share are
in pipelines/export_formats.py):

- webdataset: `NNNNN.tar` shards of at most `--shard-size` MB of images, each sample
  `<image_id>.<ext>`, `.txt` (the prompt) and `.json` (caption, tags, source, size, rank),
  with img2dataset's `NNNNN.parquet` of the shard's rows beside it;
- parquet: `part-NNNNN.parquet` files of at most `--shard-size` MB: the manifest's columns,
  `text`, and `image` (bytes and file name) with the Hugging Face `Image` feature, so
  `datasets.load_dataset("parquet", ...)` gives decoded images.

A shard is written under a temporary name and renamed when complete; exporting again starts
a new shard after the last and never rewrites one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipelines.export_formats import Writer, file_name, prompt_text, temporary


class Sharded(Writer):
    """Numbered files of at most shard_bytes of images (one image over the cap fills one alone),
    each written under a temporary name and renamed into place when complete."""

    files = False
    pattern = "{:05d}.tar"

    def __init__(self, *args):
        super().__init__(*args)
        numbers = [int(p.name.split(".")[0].split("-")[-1]) for p in self.shards()]
        self.number = max(numbers, default=-1) + 1
        self.written = 0
        self.tmp: str | None = None  # the shard being written
        self.size = 0
        # Shards are written in order on a thread of their own, while the next batch is read.
        self.serial = ThreadPoolExecutor(1)
        self.pending: deque = deque()

    def shards(self) -> list[Path]:
        return sorted(self.dest.glob(self.pattern.replace("{:05d}", "[0-9]" * 5)))

    def add(self, items: list[dict], blobs: list, pool) -> None:
        self.pending.append(self.serial.submit(self.add_now, items, blobs))
        while len(self.pending) > 2:  # at most two batches' bytes wait in memory
            self.pending.popleft().result()

    def add_now(self, items: list[dict], blobs: list) -> None:
        run: list[tuple[dict, object]] = []
        run_bytes = 0
        for item, blob in zip(items, blobs):
            if self.size + run_bytes and self.size + run_bytes + len(blob) > self.shard_bytes:
                self.append(run)
                self.close()
                run, run_bytes = [], 0
            run.append((item, blob))
            run_bytes += len(blob)
        self.append(run)

    def append(self, samples: list) -> None:
        if samples:
            if self.tmp is None:
                self.tmp = temporary(self.dest / self.pattern.format(self.number))
                self.open(self.tmp)
            self.write(samples)
            self.size += sum(len(b) for _, b in samples)

    def close(self) -> None:
        if self.tmp is not None:
            self.complete(self.tmp, self.dest / self.pattern.format(self.number))
            self.number += 1
            self.written += 1
        self.tmp, self.size = None, 0

    def finish(self) -> dict:
        try:
            while self.pending:
                self.pending.popleft().result()
            self.close()
        finally:
            self.serial.shutdown()
        return {"shards written": self.written}

    def open(self, tmp: str) -> None:
        raise NotImplementedError

    def write(self, samples: list) -> None:
        raise NotImplementedError

    def complete(self, tmp: str, path: Path) -> None:
        raise NotImplementedError


class WebDataset(Sharded):
    def exported(self) -> set[str]:
        there = set()
        for shard in self.shards():
            index = shard.with_suffix(".parquet")
            if index.is_file():
                there.update(pq.read_table(index, columns=["key"]).column("key").to_pylist())
            else:
                with tarfile.open(shard) as tar:
                    there.update(m.name.split(".", 1)[0] for m in tar)
        return there

    def open(self, tmp: str) -> None:
        # A member's bytes in one write (tarfile copies 16 KiB at a time by default).
        self.tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 24)
        self.index: list[dict] = []

    def write(self, samples: list) -> None:
        mtime = time.time()
        for item, blob in samples:
            key = item["image_id"]
            meta = {"key": key, "image_id": key, "source": item["source"], "caption": item["caption"],
                    "tags": item["tags"], "text": prompt_text(item, self.prompt), "width": item["width"],
                    "height": item["height"], "rank": item["rank"]}
            for name, data in ((file_name(item), blob), (f"{key}.txt", meta["text"].encode("utf-8")),
                               (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                self.tar.addfile(info, Reader(data))
            self.index.append({**meta, "status": "success", "sha256": key})

    def complete(self, tmp: str, path: Path) -> None:
        """img2dataset's parquet of the shard's rows, then the tar is renamed into place."""
        self.tar.close()
        write_parquet(path.with_suffix(".parquet"), pa.Table.from_pylist(self.index))
        os.replace(tmp, path)


class Reader:
    """A file object over bytes that reads views of them (io.BytesIO would copy an image)."""

    def __init__(self, data):
        self.data = memoryview(data)

    def read(self, n: int = -1) -> memoryview:
        n = len(self.data) if n < 0 else n
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


class ParquetParts(Sharded):
    all_columns = True
    pattern = "part-{:05d}.parquet"

    def exported(self) -> set[str]:
        return {i for part in self.shards() for i in pq.read_table(part, columns=["image_id"]).column(0).to_pylist()}

    def open(self, tmp: str) -> None:
        self.writer = None  # made with the first rows' schema

    def write(self, samples: list) -> None:
        """The samples' manifest rows as one row group, with their image and text."""
        from datasets import Features, Image

        items = [item for item, _ in samples]
        table = self.rows.table([item["image_id"] for item in items])
        image = pa.StructArray.from_arrays([pa.array([blob for _, blob in samples], pa.binary()),
                                            pa.array([file_name(item) for item in items], pa.string())],
                                           names=["bytes", "path"])
        table = table.add_column(0, "text", pa.array([prompt_text(i, self.prompt) for i in items], pa.string()))
        table = table.add_column(0, "image", image)
        for i, field in enumerate(table.schema):  # datasets has no map type (the manifest's `classes`)
            if pa.types.is_map(field.type):
                entry = pa.struct([pa.field("key", field.type.key_type, nullable=False),
                                   pa.field("value", field.type.item_type)])
                table = table.set_column(i, field.name, table.column(i).cast(pa.list_(entry)))
        if self.writer is None:
            features = Features.from_arrow_schema(table.schema)
            features["image"] = Image()  # datasets decodes the column as images
            self.schema = table.schema.with_metadata(features.arrow_schema.metadata)
            paths = _column_paths(self.schema)
            # The image bytes are compressed already, and min/max statistics of them would copy
            # every value (in a profile, 40% of the time writing a part).
            self.writer = pq.ParquetWriter(self.tmp, self.schema,
                                           use_dictionary=[c for c in table.column_names if c != "image"],
                                           compression={p: "none" if p == IMAGE_BYTES else "zstd" for p in paths},
                                           write_statistics=[p for p in paths if p != IMAGE_BYTES])
        self.writer.write_table(table.cast(self.schema))

    def complete(self, tmp: str, path: Path) -> None:
        self.writer.close()
        os.replace(tmp, path)


IMAGE_BYTES = "image.bytes"  # the Parquet column of the image bytes


def _column_paths(schema: pa.Schema) -> list[str]:
    """The Parquet columns (leaf paths) an Arrow schema is written as."""
    probe = io.BytesIO()  # an empty file: the library's own mapping to Parquet column paths
    pq.write_table(schema.empty_table(), probe)
    columns = pq.read_metadata(pa.BufferReader(probe.getvalue())).schema
    return [columns.column(i).path for i in range(len(columns))]


def write_parquet(path: Path, table: pa.Table) -> None:
    tmp = temporary(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
