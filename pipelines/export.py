"""`curate export DS DEST --format kohya|imagefolder|webdataset|parquet`: the chosen images
with their text, in the layout another trainer or library reads (pipelines/export_formats.py).

- The images are the manifest's rows matching `--where`; their text is the manifest's
  caption and tags (the latest of any model or import), made into one prompt by `--prompt`.
- Nothing half-written is ever visible: every file is written under a temporary name
  (`.tmp-<pid>-...`) and renamed when complete; a killed export leaves temporaries that the
  next one removes. DEST holds `.curate-export.json` (format, prompt, each run), written
  first: exporting again to the same DEST adds the images not there yet (an image file of
  the wrong size counts as not there) and refreshes the text files that can change
  (kohya's .txt, imagefolder's metadata.jsonl); shards and parquet parts are never rewritten.
- Image bytes come from the dataset; with `--link hard|sym` (file formats) the image file
  links to a source file instead, when one still has the same sha256 (else its bytes are
  written). An image whose bytes are in neither place is reported, after the rest is done.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate.images import ImageError
from curate.pipelines.export_formats import ImageFolder, Kohya, RowIndex, Writer, write_atomic
from curate.pipelines.export_shards import ParquetParts, WebDataset
from curate.pipelines.rows import binary_views
from curate.progress import progress_bar
from curate.storage import LOCATOR_COLUMNS, holds_image, read_referenced
from curate.store import Dataset, now, remove_stale_temporaries

PROMPTS = ("both", "tags", "caption")
LINKS = ("copy", "hard", "sym")
MARKER = ".curate-export.json"
FORMATS: dict[str, type[Writer]] = {"kohya": Kohya, "imagefolder": ImageFolder, "webdataset": WebDataset,
                                    "parquet": ParquetParts}
BATCH = 64  # images read from the dataset at a time
WRITERS = 4  # file writes in flight: file systems overlap them (more than the cores)
MAX_LISTED = 5  # unavailable images named in the error


class ExportError(Exception):
    """A mistake the user can fix: a misspelt choice, a DEST that is not an export."""


def choose(value: str, options, what: str) -> str:
    """`value` if it is one of `options`, else an error that suggests the nearest."""
    if value in options:
        return value
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ExportError(f"unknown {what} {value!r}{hint} ({', '.join(options)})")


def export(ds: Dataset, dest: str | os.PathLike, fmt: str = "kohya", where: str | None = None, prompt: str = "both",
           link: str = "copy", shard_mb: float = 1000, show_progress: bool = True) -> dict:
    """Export the images matching `where` to `dest`; returns the summary (with `unavailable`:
    the (image_id, source) of images whose bytes are gone)."""
    fmt, prompt, link = choose(fmt, FORMATS, "format"), choose(prompt, PROMPTS, "prompt"), choose(link, LINKS, "link")
    if link != "copy" and not FORMATS[fmt].files:
        raise ExportError(f"--link {link} needs image files; {fmt} puts the bytes inside its "
                          f"{'shards' if fmt == 'webdataset' else 'parquet files'}: use --link copy")
    if shard_mb <= 0:
        raise ExportError("--shard-size must be a positive number of MB")
    dest = Path(dest)
    marker = open_dest(dest, ds, fmt, prompt)
    manifest = selected(ds, where, full=FORMATS[fmt].all_columns)
    rows_of = RowIndex(manifest)
    writer: Writer = FORMATS[fmt](dest, prompt, int(shard_mb * (1 << 20)), rows_of)
    for folder in writer.folders():
        remove_stale_temporaries(folder)  # left by a killed export
    there = writer.exported()
    todo = [i for i in manifest.column("image_id").to_pylist() if i not in there]
    with progress_bar(f"export {fmt} -> {dest}", len(todo), enabled=show_progress) as advance, \
            ThreadPoolExecutor(WRITERS) as pool:
        counts, unavailable = transfer(ds, writer, rows_of, todo, link, pool, advance, prune=bool(where or there))
    written = writer.finish()
    record_run(dest, marker, where, len(todo) - len(unavailable))
    return {"format": fmt, "selected": manifest.num_rows, "exported": len(todo) - len(unavailable),
            "already there": len(there & set(manifest.column("image_id").to_pylist())), **counts,
            "without text": without_text(manifest, prompt), **written, "unavailable": unavailable}


def transfer(ds: Dataset, writer: Writer, rows: RowIndex, todo: list[str], link: str, pool,
             advance, prune: bool = True) -> tuple[Counter, list[tuple[str, str]]]:
    """Put each image into DEST: linked to a source file that still holds it (--link hard|sym),
    else its bytes from the dataset, else from such a source file (the dataset lost them).
    Returns the counts, and the (image_id, source) of images found in neither place. `prune`:
    read only the row groups that hold an image of `todo` (a --where, or a re-export)."""
    counts: Counter = Counter()
    rest = todo
    if link != "copy":
        rest = []
        for batch in chunks(todo, BATCH):
            items = rows.take(batch)
            sources = list(pool.map(same_source, items))
            linked = [(item, src) for item, src in zip(items, sources) if src]
            list(pool.map(lambda pair: writer.link(pair[0], pair[1], link), linked))
            counts["linked"] += len(linked)
            advance(len(linked))
            rest += [item["image_id"] for item, src in zip(items, sources) if not src]
    found = set()
    for ids, blobs in stored_bytes(ds, rest, prune):
        found.update(ids)
        writer.add(rows.take(ids), blobs, pool)
        counts["copied"] += len(ids)
        advance(len(ids))
    unavailable = []
    for item in rows.take([i for i in rest if i not in found]):
        src = same_source(item) if link == "copy" else None  # (the link modes tried them already)
        if src:
            writer.add([item], [Path(src).read_bytes()], pool)
            counts["copied from the source"] += 1
        else:
            unavailable.append((item["image_id"], item["source"]))
        advance(1)
    return counts, unavailable


def without_text(manifest: pa.Table, prompt: str) -> int:
    """Images whose prompt is empty (no caption and no tags for `both`)."""
    caption, tags = pc.is_null(manifest.column("caption")), pc.is_null(manifest.column("tags"))
    empty = pc.and_(caption, tags) if prompt == "both" else caption if prompt == "caption" else tags
    return pc.sum(empty.cast(pa.int64())).as_py() or 0


def open_dest(dest: Path, ds: Dataset, fmt: str, prompt: str) -> dict:
    """Check DEST is new, empty or an export of the same format and prompt; write the marker."""
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} is a file; give a directory for the export")
    path = dest / MARKER
    if path.is_file():
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{path} is damaged ({e}); export to a new directory") from None
        if (marker.get("format"), marker.get("prompt")) != (fmt, prompt):
            raise ExportError(f"{dest} holds a {marker.get('format')} export with --prompt {marker.get('prompt')}; "
                              f"export again with those, or to another directory")
        return marker
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} is not empty and holds no curate export ({MARKER}); give a new or empty "
                          "directory")
    dest.mkdir(parents=True, exist_ok=True)
    marker = {"format": fmt, "prompt": prompt, "dataset": str(ds.root), "runs": []}
    write_atomic(path, json.dumps(marker, indent=1).encode())
    return marker


def record_run(dest: Path, marker: dict, where: str | None, added: int) -> None:
    marker["runs"].append({"at": now().isoformat(timespec="seconds"), "where": where, "added": added})
    write_atomic(dest / MARKER, json.dumps(marker, indent=1).encode())


def selected(ds: Dataset, where: str | None, full: bool) -> pa.Table:
    """The manifest rows of the images matching `where` (every column, or those the text and
    file names need), in image_id order."""
    return ds.select(where, ["*"] if full else ["image_id", "source", "sources", "format", "width", "height",
                                               "size_bytes", "caption", "tags", "rank", "bucket_width",
                                               "bucket_height"])


def stored_bytes(ds: Dataset, ids: list[str], prune: bool = True) -> Iterator[tuple[list[str], list[memoryview]]]:
    """(image ids, their bytes) from the images table in storage order, each image once; only
    the row groups holding a wanted image are read (unless not `prune`: when nearly every
    group holds one, finding them costs more than it saves), and the bytes are views of Arrow's memory
    (a filter or take would copy every image), or a referenced image's, read at its source."""
    if not ids:
        return
    wanted = set(ids)
    # The wanted ids are checked below, with the set: an `isin` here would hash them all again.
    projection = {c: pc.field(c) for c in ("image_id", "bytes", "size_bytes", *LOCATOR_COLUMNS)} | {
        "_keep": holds_image()}
    for batch in ds.scan("images", projection, batch_size=BATCH, use_threads=False, ids=wanted if prune else None):
        batch_ids, out = [], []
        located = batch.select(["image_id", "size_bytes", *LOCATOR_COLUMNS]).to_pylist()
        for row, k, blob in zip(located, batch.column("_keep").to_pylist(), binary_views(batch.column("bytes"))):
            if not k or row["image_id"] not in wanted:
                continue
            if blob is None:  # referenced: read at its source (moved or changed: left to the fallbacks)
                try:
                    blob = read_referenced(row)
                except ImageError:
                    continue
            wanted.discard(row["image_id"])
            batch_ids.append(row["image_id"])
            out.append(blob)
        if batch_ids:
            yield batch_ids, out


def same_source(item: dict) -> str | None:
    """A source file of the image that still holds the same bytes (size, then sha256), if any."""
    for source in item["sources"] or [item["source"]]:
        try:
            if "::" in source or os.stat(source).st_size != item["size_bytes"]:
                continue
            digest = hashlib.sha256()
            with open(source, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            continue
        if digest.hexdigest() == item["image_id"]:
            return source
    return None


def chunks(items: list, n: int) -> Iterator[list]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


