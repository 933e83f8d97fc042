"""`curate ingest`: every image file in the sources gets exactly one row in `images`.

Sources are folders (walked recursively, symlinked folders not followed), single files
and tar archives (webdataset shards too). A file is a candidate if its extension is an
image extension or its first bytes sniff as an image. Each candidate becomes an ok row
(image_id = sha256 of the bytes) or an error row with a code. Exact duplicates share an
image_id and only the first copy stores bytes. Sources already in the table are skipped,
so ingesting again adds only what is new.

Reading and validating files is the slow part: `--engine local` runs it on a thread
pool, `--engine ray` as Ray Data tasks (a chunk of files, or one whole tar shard, per
task). Deduplication and writing stay on the driver, in the order the sources were
walked, so both engines write the same rows and a killed run resumes to the same table.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from curate.images import MAX_FILE_BYTES, ImageError, decode, decode_threads, quick_gil_handoffs, read_file
from curate.manifest import Dataset, now
from curate.progress import progress_bar
from curate.schema import SCHEMAS
from pipelines.ray_engine import RAY_TASK_RETRIES, init_ray
from pipelines.runner import PART_ROWS, PartWriter

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".jp2", ".j2k",
}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
INGEST_BATCH = min(64, PART_ROWS)  # candidates per unit of work (and per part at most)


@dataclass
class Candidate:
    source: str  # how the row names it: a path, or archive.tar::member
    path: str | None = None  # read from disk in a worker
    data: bytes | None = None  # already read (tar members)
    error: ImageError | None = None  # already failed (unsafe tar member)
    archive: str | None = None  # a whole tar archive, expanded by the worker (Ray engine)


def display_name(path: str | bytes) -> str:
    """A path as text; bytes that are not UTF-8 are shown as \\xNN escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def sniffs_as_image(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return False
    return head.startswith(MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def is_candidate(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES) and os.path.isfile(path)


def check_sources(sources: list[str]) -> None:
    """Fail before writing anything if a source is missing (a typo must not half-ingest)."""
    missing = [s for s in sources if not os.path.lexists(s)]
    if missing:
        raise FileNotFoundError(f"source does not exist: {', '.join(missing)}")


def enumerate_sources(sources: list[str], expand_tars: bool = True) -> Iterator[Candidate]:
    """Every candidate in walk order (sorted names), so two runs see the same order."""
    for src in sources:
        p = os.path.abspath(src)
        if os.path.isdir(p) and not os.path.islink(p):
            yield from _walk(p, expand_tars)
        elif is_tar(p):
            yield from _tar(p, expand_tars)
        else:
            yield Candidate(display_name(p), path=p)


def _walk(root: str, expand_tars: bool) -> Iterator[Candidate]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        # A directory named like an image is an entry users expect to hear about.
        for d in dirnames:
            if is_candidate(d):
                yield Candidate(display_name(os.path.join(dirpath, d)), path=os.path.join(dirpath, d))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if is_tar(full):
                yield from _tar(full, expand_tars)
            elif is_candidate(name) or (os.path.isfile(full) and sniffs_as_image(full)):
                yield Candidate(display_name(full), path=full)


def _tar(archive: str, expand: bool) -> Iterator[Candidate]:
    if expand:
        yield from tar_members(archive)
    else:
        yield Candidate(display_name(archive) + "::", archive=archive)


def tar_members(archive: str) -> Iterator[Candidate]:
    """Image members of a tar, read in order; nothing is ever extracted to disk."""
    prefix = display_name(archive) + "::"
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = display_name(member.name)
                if not is_candidate(name):
                    continue
                if os.path.isabs(member.name) or ".." in Path(member.name).parts:
                    yield Candidate(prefix + name, error=ImageError("unsafe_path", "tar member escapes the archive"))
                elif not member.isfile():
                    yield Candidate(prefix + name, error=ImageError("not_regular_file", "tar member is not a regular file"))
                elif member.size > MAX_FILE_BYTES:
                    yield Candidate(prefix + name, error=ImageError("too_large", f"{member.size} bytes is over the cap"))
                else:
                    f = tar.extractfile(member)
                    yield Candidate(prefix + name, data=f.read() if f else b"")
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Candidate(prefix, error=ImageError("unreadable", f"tar archive: {e}"))


def inspect_candidate(c: Candidate) -> dict:
    """Read, hash and validate one candidate; returns an images row (bytes included)."""
    row = {"source": c.source, "image_id": None, "bytes": None, "size_bytes": None, "width": None,
           "height": None, "format": None, "mode": None, "animated": None,
           "status": "ok", "error": None, "message": None, "created_at": now()}
    try:
        if c.error:
            raise c.error
        data = c.data if c.data is not None else read_file(c.path)
        row["size_bytes"] = len(data)
        row["image_id"] = hashlib.sha256(data).hexdigest() if data else None
        d = decode(data, min_side=1)  # full validation; JPEGs at 1/8 scale for speed
        row.update(bytes=data, width=d.width, height=d.height, format=d.format, mode=d.mode, animated=d.animated)
    except ImageError as e:
        row.update(status="error", error=e.code, message=e.message)
    return row


def inspect_unit(unit: list[Candidate]) -> list[dict]:
    """Rows for a unit of work: a chunk of files, or one tar archive expanded here."""
    rows = []
    for c in unit:
        members = tar_members(c.archive) if c.archive else [c]
        rows.extend(inspect_candidate(m) for m in members)
    return rows


# ---- engines: both yield lists of rows in walk order ----------------------------------
def _inspect_local(sources: list[str], seen: set[str]) -> Iterator[list[dict]]:
    candidates = (c for c in enumerate_sources(sources) if c.source not in seen)
    with ThreadPoolExecutor(decode_threads()) as pool, quick_gil_handoffs():
        # One chunk is always in flight while the previous one is deduplicated and written.
        pending: list = []
        for batch in _chunks(candidates, INGEST_BATCH):
            pending.append([pool.submit(inspect_candidate, c) for c in batch])
            if len(pending) > 1:
                yield [f.result() for f in pending.pop(0)]
        for futures in pending:
            yield [f.result() for f in futures]


def _work_units(sources: list[str], seen: set[str]) -> Iterator[list[Candidate]]:
    chunk: list[Candidate] = []
    for c in enumerate_sources(sources, expand_tars=False):
        if c.archive:  # a tar shard is one unit; its members already seen are dropped later
            if chunk:
                yield chunk
                chunk = []
            yield [c]
        elif c.source not in seen:
            chunk.append(c)
            if len(chunk) == INGEST_BATCH:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _inspect_units(batch: pa.Table) -> pa.Table:
    """Ray Data task: inspect the pickled units of a batch."""
    rows = [row for blob in batch.column("unit").to_pylist() for row in inspect_unit(pickle.loads(blob))]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["images"])


def _inspect_ray(sources: list[str], seen: set[str], ray_address: str | None) -> Iterator[list[dict]]:
    ray = init_ray(ray_address)
    # Units are pickled: paths may hold bytes that are not UTF-8, which Arrow strings cannot.
    units = [{"unit": pickle.dumps(u)} for u in _work_units(sources, seen)]
    if not units:
        return
    data = ray.data.from_items(units, override_num_blocks=len(units))
    with warnings.catch_warnings():  # max_retries has no named parameter in map_batches yet
        warnings.simplefilter("ignore", DeprecationWarning)
        data = data.map_batches(_inspect_units, batch_size=1, batch_format="pyarrow", num_cpus=1,
                                max_retries=RAY_TASK_RETRIES)
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # dedupe keeps the first copy in walk order
    try:
        for batch in data.iter_batches(batch_format="pyarrow", batch_size=None):
            yield batch.to_pylist()
    finally:
        context.execution_options.preserve_order = preserve


def ingest(sources: list[str], ds: Dataset, show_progress: bool = True, engine: str = "local",
           ray_address: str | None = None) -> dict:
    started = time.perf_counter()
    check_sources(sources)
    # Only light columns: the table may hold a terabyte of bytes. Every ok image_id has
    # its bytes in the first row that names it, and parts land in order, so "has an ok
    # row" means "stored".
    existing = ds.read("images", ["source", "image_id", "status"])
    seen_sources: set[str] = set(existing.column("source").to_pylist())
    stored_ids = {i for i, s in zip(existing.column("image_id").to_pylist(), existing.column("status").to_pylist())
                  if s == "ok"}
    del existing

    counts: Counter = Counter()
    rows_in_order = _inspect_local(sources, seen_sources) if engine == "local" else \
        _inspect_ray(sources, seen_sources, ray_address)
    with progress_bar("ingest", None, enabled=show_progress) as advance, PartWriter(ds, "images") as writer:
        for rows in rows_in_order:
            rows = [r for r in rows if r["source"] not in seen_sources]
            for row in rows:
                if row["status"] == "ok":
                    if row["image_id"] in stored_ids:
                        row["bytes"] = None  # an exact duplicate: keep the source, not the bytes again
                        counts["duplicate"] += 1
                    stored_ids.add(row["image_id"])
                counts[row["status"] if row["status"] == "ok" else row["error"]] += 1
                seen_sources.add(row["source"])
            if rows:
                writer.add(pa.Table.from_pylist(rows, schema=SCHEMAS["images"]))
            advance(len(rows))
    counts_dict = dict(counts)
    counts_dict["seconds"] = round(time.perf_counter() - started, 2)
    return counts_dict


def _chunks(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
