"""`curate ingest`: every image file in the sources gets exactly one row in `images`.

Sources are folders (walked recursively, symlinked folders not followed), single files
and tar archives (webdataset shards too). A file is a candidate if its extension is an
image extension or its first bytes sniff as an image. Each candidate becomes an ok row
(image_id = sha256 of the bytes) or an error row with a code. Exact duplicates share an
image_id and only the first copy stores bytes. Sources already in the table are skipped,
so ingesting again adds only what is new.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from curate.images import ImageError, decode, read_file
from curate.manifest import Dataset, now
from curate.progress import progress_bar
from curate.schema import SCHEMAS
from pipelines.runner import PartWriter

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".jp2", ".j2k",
}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
INGEST_BATCH = 64


@dataclass
class Candidate:
    source: str  # how the row names it: a path, or archive.tar::member
    path: str | None = None  # read from disk in a worker
    data: bytes | None = None  # already read (tar members)
    error: ImageError | None = None  # already failed (unsafe tar member)


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


def enumerate_sources(sources: list[str]) -> Iterator[Candidate]:
    for src in sources:
        p = os.path.abspath(src)
        if os.path.isdir(p) and not os.path.islink(p):
            yield from _walk(p)
        elif p.lower().endswith(TAR_SUFFIXES) and os.path.isfile(p):
            yield from _tar_members(p)
        elif os.path.lexists(p):
            yield Candidate(display_name(p), path=p)
        else:
            raise FileNotFoundError(f"source does not exist: {src}")


def _walk(root: str) -> Iterator[Candidate]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        # A directory named like an image is an entry users expect to hear about.
        for d in dirnames:
            if is_candidate(d):
                yield Candidate(display_name(os.path.join(dirpath, d)), path=os.path.join(dirpath, d))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name.lower().endswith(TAR_SUFFIXES) and os.path.isfile(full):
                yield from _tar_members(full)
            elif is_candidate(name) or (os.path.isfile(full) and sniffs_as_image(full)):
                yield Candidate(display_name(full), path=full)


def _tar_members(archive: str) -> Iterator[Candidate]:
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
                else:
                    f = tar.extractfile(member)
                    yield Candidate(prefix + name, data=f.read() if f else b"")
    except (tarfile.TarError, OSError) as e:
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


def ingest(sources: list[str], ds: Dataset, show_progress: bool = True) -> dict:
    started = time.perf_counter()
    existing = ds.read("images", ["source", "image_id", "bytes"]) if ds.parts("images") else None
    seen_sources: set[str] = set(existing.column("source").to_pylist()) if existing is not None else set()
    stored_ids: set[str] = set()
    if existing is not None:
        stored_ids = {i for i, b in zip(existing.column("image_id").to_pylist(), existing.column("bytes").is_valid().to_pylist()) if b}
    del existing

    counts: Counter = Counter()
    candidates = (c for c in enumerate_sources(sources) if c.source not in seen_sources)
    workers = max(1, min(8, os.cpu_count() or 1))
    with progress_bar("ingest", None, enabled=show_progress) as advance, PartWriter(ds, "images") as writer, \
            ThreadPoolExecutor(workers) as pool:
        for batch in _chunks(candidates, INGEST_BATCH):
            rows = list(pool.map(inspect_candidate, batch))
            for row in rows:
                if row["status"] == "ok":
                    if row["image_id"] in stored_ids:
                        row["bytes"] = None  # an exact duplicate: keep the source, not the bytes again
                        counts["duplicate"] += 1
                    stored_ids.add(row["image_id"])
                counts[row["status"] if row["status"] == "ok" else row["error"]] += 1
                seen_sources.add(row["source"])
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
