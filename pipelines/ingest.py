"""`curate ingest`: every image file in the sources gets exactly one row in `images`.

Sources are folders (walked recursively, symlinked folders not followed), single files
and tar archives (webdataset shards too), locally or under an s3:// prefix. A file is a candidate if its extension is an
image extension or its first bytes sniff as an image. Each candidate becomes an ok row
(image_id = sha256 of the bytes) or an error row with a code. Exact duplicates share an
image_id and only the first copy stores bytes. Sources already in the table are skipped,
so ingesting again adds only what is new.

Ingest is the executor's source stage: the driver walks the sources and names each
candidate (a path, or a tar member's archive, offset and size; nothing is read yet),
CPU workers read, hash and verify them (`prepare`), and the driver, in walk order,
keeps the bytes of each image's first copy only (`commit`), so both engines write the
same rows and a killed run resumes to the same table.

With `reference`, no bytes are copied: a row keeps the image's locator (its file or object,
or its tar archive and the member's offset), with the size and modification time the file had;
stages read the bytes there (curate.storage.read_referenced). A member of a compressed tar has
no offset to read it at, so its bytes are stored as with a copy.

Hashing comes first, so an exact duplicate is never decoded: the same bytes give the same
verdict. A copy of an image already stored takes its size and format from its header; a
copy whose twin is being verified on another thread waits for that verdict (`Verdicts`).

Captions and tags that come with the images (kohya/EveryDream2 side files, webdataset and
img2dataset members and parquet, Hugging Face dataset columns) are named with their image
while walking, read with it, and written to `captions` and `tags` (pipelines/sidecars.py);
an image stored by an earlier run is named again when it has side files, so an edited one
is imported. Hugging Face datasets and parquet files of images are sources of their own
(pipelines/hf_source.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate.images import MAX_FILE_BYTES, Header, ImageError, probe, read_file, verify
from curate.pipelines.executor import Summary, run
from curate.pipelines.hf_source import hf_candidates, is_hf_source, is_image_parquet, read_image, release
from curate.pipelines.sidecars import (
    MAX_SIDE_BYTES,
    TEXT_READINGS,
    SideImports,
    folder_sides,
    img2dataset_records,
    is_side_file,
    read_sides,
    tar_samples,
)
from curate.pipelines.stage import Stage
from curate.pipelines.work import DoneKeys
from curate.schema import SCHEMAS
from curate.storage import LOCATOR_COLUMNS, exists, filesystem, is_remote, list_files, read_object, stat
from curate.store import Dataset, now

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".jp2", ".j2k",
}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
INGEST_BATCH = 64  # candidates per batch
STORED_LOOK_SECONDS = 5.0  # how often commit() looks for images that other runs stored


def candidate(source: str, **where) -> dict:
    """An input row: how the table names it (a path, or archive.tar::member) and where its
    bytes are: `path`; `archive`, `offset` and `size` (a member of an uncompressed tar);
    `data` (a member of a compressed tar, read while walking it); or `error` (code, message)."""
    return {"source": source, **where}


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


def check_sources(sources: list[str], caption_column: str | None = None, tags_column: str | None = None) -> None:
    """Fail before writing anything if a source is missing (a typo must not half-ingest), or a
    Hugging Face source lacks an image column or a column asked for."""
    missing = [s for s in sources
               if not s.startswith("hf:") and not (exists(s) if is_remote(s) else os.path.lexists(s))]
    if missing:
        raise FileNotFoundError(f"source does not exist: {', '.join(missing)}")
    for src in sources:
        if is_hf_source(src):
            next(hf_candidates(src, caption_column, tags_column), None)


def enumerate_sources(sources: list[str], caption_column: str | None = None,
                      tags_column: str | None = None) -> Iterator[dict]:
    """Every candidate in walk order (sorted names), so two runs see the same order."""
    for src in sources:
        if is_remote(src):
            yield from _walk_remote(src)
            continue
        p = os.path.abspath(src)
        if is_hf_source(src):
            yield from hf_candidates(src, caption_column, tags_column)
        elif os.path.isdir(p) and not os.path.islink(p):
            yield from _walk(p, caption_column, tags_column)
        elif is_tar(p):
            yield from tar_samples(tar_members(p), img2dataset_records(p.rpartition(".tar")[0]))
        else:
            yield candidate(display_name(p), path=p)


def _walk(root: str, caption_column: str | None, tags_column: str | None) -> Iterator[dict]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        # A directory named like an image is an entry users expect to hear about.
        for d in dirnames:
            if is_candidate(d):
                yield candidate(display_name(os.path.join(dirpath, d)), path=os.path.join(dirpath, d))
        names, records = set(filenames), img2dataset_records(dirpath)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if is_tar(full):
                yield from tar_samples(tar_members(full), img2dataset_records(full.rpartition(".tar")[0]))
            elif is_image_parquet(full):
                yield from hf_candidates(full, caption_column, tags_column)
            elif is_candidate(name) or (not is_side_file(name) and os.path.isfile(full) and sniffs_as_image(full)):
                shown = display_name(full)
                side = folder_sides(full, shown, names, records)
                yield candidate(shown, path=full, **({"side": side} if side else {}))


def _walk_remote(prefix: str) -> Iterator[dict]:
    """Objects under an s3:// prefix, by key: image extensions only (sniffing would be a request each);
    a shard's own caption members come with its images, side files beside loose objects do not."""
    for location in list_files(prefix):
        if location.lower().endswith(TAR_SUFFIXES):
            yield from tar_samples(tar_members(location), {})
        elif is_candidate(location):
            yield candidate(location, path=location)


def _open_tar(archive: str, mode: str) -> tarfile.TarFile:
    if is_remote(archive):  # headers are read through a seekable remote file: data is skipped, not fetched
        fs, path = filesystem(archive)
        return tarfile.open(fileobj=fs.open_input_file(path), mode=mode)
    return tarfile.open(archive, mode)


def tar_members(archive: str) -> Iterator[dict]:
    """Image members of a tar, in order; nothing is ever extracted to disk. Only headers are
    read here: a member of an uncompressed tar is read later, by offset, where it is checked."""
    prefix = display_name(archive) + "::"
    try:
        compressed = not _plain_tar(archive)
        with _open_tar(archive, "r:*") as tar:
            for member in tar:
                name = display_name(member.name)
                if is_side_file(name) and member.isfile() and member.size <= MAX_SIDE_BYTES \
                        and not os.path.isabs(member.name) and ".." not in Path(member.name).parts:
                    # a sample's caption or metadata: grouped with its image by tar_samples
                    ext = os.path.splitext(name)[1].lower()
                    where = {"data": tar.extractfile(member).read()} if compressed or member.issparse() else \
                        {"archive": archive, "offset": member.offset_data, "size": member.size}
                    yield candidate(prefix + name, side_member=True, ext=ext, **where)
                    continue
                if not is_candidate(name):
                    continue
                if os.path.isabs(member.name) or ".." in Path(member.name).parts:
                    yield candidate(prefix + name, error=("unsafe_path", "tar member escapes the archive"))
                elif not member.isfile():
                    yield candidate(prefix + name, error=("not_regular_file", "tar member is not a regular file"))
                elif member.size > MAX_FILE_BYTES:
                    yield candidate(prefix + name, error=("too_large", f"{member.size} bytes is over the cap"))
                elif compressed or member.issparse():
                    f = tar.extractfile(member)
                    yield candidate(prefix + name, data=f.read() if f else b"")
                else:
                    yield candidate(prefix + name, archive=archive, offset=member.offset_data, size=member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield candidate(prefix, error=("unreadable", f"tar archive: {e}"))


def _plain_tar(archive: str) -> bool:
    """Whether the archive is an uncompressed tar (whose members can be read by offset)."""
    try:
        with _open_tar(archive, "r:"):
            return True
    except tarfile.TarError:
        return False


def read_member(archive: str, offset: int, size: int) -> bytes:
    """A member of an uncompressed tar, by its data offset and size."""
    if is_remote(archive):
        data = read_object(archive, offset, size)
    else:
        data = _read_local(archive, offset, size)
    if len(data) != size:
        raise ImageError("truncated", f"the archive ends {size - len(data)} bytes into this member")
    return data


def _read_local(archive: str, offset: int, size: int) -> bytes:
    try:
        with open(archive, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise ImageError("unreadable", f"tar archive: {e.strerror or e}") from None
    return data


class Verdicts:
    """What this process knows about image ids, shared by its threads: the ids stored ok (ingest's
    driver fills it as it commits rows) and the verifications in flight.

    A copy of a stored image is not decoded again; a copy whose twin is being verified right
    now waits for that verdict instead of verifying the same bytes a second time."""

    def __init__(self, stored: set[str]):
        self.stored = stored
        self.in_flight: dict[str, Future] = {}
        self.lock = threading.Lock()

    def check(self, image_id: str, data: bytes) -> tuple[Header | ImageError, bool]:
        """(the header, or the error the bytes fail with; whether the image is stored already)."""
        if image_id in self.stored:
            return _outcome(probe, data), True
        with self.lock:
            future = self.in_flight.get(image_id)
            mine = future is None
            if mine:
                future = self.in_flight[image_id] = Future()
        if mine:
            try:
                future.set_result(_outcome(verify, data))
            except BaseException as e:  # a bug: the twins waiting see it too
                future.set_exception(e)
        return future.result(), False

    def committed(self, image_id: str) -> None:
        """The driver wrote the row of this image's first copy: later copies look it up in `stored`."""
        self.in_flight.pop(image_id, None)


def _outcome(check, data: bytes) -> Header | ImageError:
    try:
        return check(data)
    except ImageError as e:
        return e


def read_bytes(c: dict) -> bytes:
    """The bytes a candidate (or a side file of one) names."""
    if c.get("data") is not None:
        return c["data"]
    if c.get("archive"):
        return read_member(c["archive"], c["offset"], c["size"])
    if c.get("hf"):
        return read_image(c["hf"])
    if is_remote(c["path"]):
        return read_object(c["path"])
    return read_file(c["path"])


def blank_row(source: str) -> dict:
    return {"source": source, "image_id": None, "bytes": None, "size_bytes": None, "width": None,
            "height": None, "format": None, "mode": None, "animated": None,
            "status": "ok", "error": None, "message": None, **dict.fromkeys(LOCATOR_COLUMNS)}


def inspect(c: dict, verdicts: Verdicts, reference: bool = False) -> dict:
    """Read, hash and verify one candidate; returns an images row (bytes included, except for
    a copy of an image already stored, or with `reference` its locator instead)."""
    row = blank_row(c["source"])
    try:
        if c.get("error"):
            raise ImageError(*c["error"])
        locator = None
        if reference and (c.get("archive") or c.get("path")):  # a file, or a member of a plain tar
            location = c.get("archive") or c["path"]  # measured before the read: a change during it shows later
            locator = dict(zip(LOCATOR_COLUMNS, (location, c.get("offset"), *stat(location))))
        data = read_bytes(c)
        row["size_bytes"] = len(data)
        if not data:
            raise ImageError("empty", "zero bytes")
        row["image_id"] = hashlib.sha256(data).hexdigest()
        verdict, stored = verdicts.check(row["image_id"], data)
        if isinstance(verdict, ImageError):
            raise verdict
        if locator and not stored:
            row.update(locator)
        row.update(bytes=None if stored or locator else data, width=verdict.width, height=verdict.height,
                   format=verdict.format, mode=verdict.mode, animated=verdict.animated)
    except ImageError as e:
        row.update(status="error", error=e.code, message=e.message)
    return row


class IngestStage(Stage):
    """The source stage: candidates in, one images row each; exact duplicates store bytes once."""

    table = "images"
    source = None
    key = "source"
    batch_size = INGEST_BATCH
    ordered = True  # the first copy of an image, in walk order, keeps the bytes

    def __init__(self, sources: list[str], sidecar_text: str = "auto", caption_column: str | None = None,
                 tags_column: str | None = None, reference: bool = False):
        self.sources, self.reference = list(sources), reference
        self.sidecar_text = sidecar_text  # how .txt/.caption side files read (pipelines/sidecars.py)
        self.caption_column, self.tags_column = caption_column, tags_column  # Hugging Face sources
        self._sides: SideImports | None = None

    def model_key(self) -> str:
        return "ingest"

    def done_filter(self):
        return pc.scalar(True)  # a source with any row is ingested

    def inputs(self, ds: Dataset) -> Iterator[dict]:
        # Only light columns: the table may hold a terabyte of bytes. Every ok image_id has
        # its bytes in the first row that names it, and parts land in order, so "has an ok
        # row" means "stored".
        # Stored ids appear as other runs write parts; commit() looks for them (_stored_ids).
        self._stored_ids = DoneKeys(ds, "images", "image_id", pc.field("status") == "ok")
        self._stored_ids.skip_present()
        self._looked = time.monotonic()
        existing = ds.read("images", ["source", "image_id", "status"])
        ids, status = existing.column("image_id").to_pylist(), existing.column("status").to_pylist()
        # source -> its image when stored ok, whose side files are read again (they may have changed)
        seen = dict(zip(existing.column("source").to_pylist(), (i if s == "ok" else None for i, s in zip(ids, status))))
        self._verdicts = Verdicts({i for i, s in zip(ids, status) if s == "ok"})
        self._ds = ds
        del existing, ids, status
        for c in enumerate_sources(self.sources, self.caption_column, self.tags_column):
            if c["source"] not in seen:
                seen[c["source"]] = None
                yield c
            elif c.get("side") and seen[c["source"]]:
                yield {"source": c["source"], "known": seen[c["source"]], "side": c["side"]}
                seen[c["source"]] = None
            else:  # named all the same: the units of work are cut from the whole walk (Work.plan)
                yield {"source": c["source"], "present": True}

    def prepare(self, row: dict) -> dict:
        if getattr(self, "_verdicts", None) is None:  # a Ray worker: it knows the copies it has seen
            self._verdicts = Verdicts(set())
        known = row.get("known")  # an image stored by an earlier run: only its side files are read
        out = inspect(row, self._verdicts, self.reference) if known is None else \
            {**blank_row(row["source"]), "image_id": known, "status": "known"}
        sides = read_sides(row["side"], out["image_id"], self.sidecar_text, read_bytes) \
            if row.get("side") and out["status"] != "error" else None
        out["_side"] = json.dumps(sides) if sides else None
        return out

    def process(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != self.key}

    def rows(self, ids: list[str], columns: dict) -> pa.Table:
        n = len(ids)
        if "_error" in columns:  # prepare failed outright (a bug): an error row naming the source
            columns = {"status": ["error"] * n, "error": columns["_error"], "message": columns["_message"]}
        columns = {**columns, "source": ids, "created_at": [now()] * n}
        schema = SCHEMAS["images"]
        table = pa.table({f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)
        return table.append_column("_side", pa.array(columns.get("_side", [None] * n), pa.string()))

    def counts(self, table: str, rows: pa.Table) -> dict[str, int]:
        if table != self.table:  # a side file's caption or tags
            ok = pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0
            return {k: v for k, v in {f"{table} imported": ok, "side files unreadable": len(rows) - ok}.items() if v}
        duplicates = pc.sum(pc.and_(pc.equal(rows.column("status"), "ok"), pc.is_null(rows.column("bytes")))).as_py()
        return {"duplicate": duplicates} if duplicates else {}

    def commit(self, rows: pa.Table) -> pa.Table | dict[str, pa.Table]:
        """Drop the bytes (or locator) of an image already stored (an exact duplicate keeps its source
        only), by this run or, since it started, by another (looked for every few seconds); the
        captions and tags of side files go to their tables when they are new."""
        if time.monotonic() - self._looked > STORED_LOOK_SECONDS:
            self._verdicts.stored.update(self._stored_ids.new())
            self._looked = time.monotonic()
        rows, imported = self._imports(rows)
        ids, status = rows.column("image_id").to_pylist(), rows.column("status").to_pylist()
        stored, keep = self._verdicts.stored, []
        for image_id, st in zip(ids, status):
            keep.append(not (st == "ok" and image_id in stored))
            if st == "ok":
                stored.add(image_id)
            if image_id:
                self._verdicts.committed(image_id)
        if not all(keep):
            for name in ("bytes", *LOCATOR_COLUMNS):
                data = rows.column(name)
                rows = rows.set_column(rows.schema.get_field_index(name), name,
                                       pc.if_else(pa.array(keep), data, pa.nulls(len(rows), data.type)))
        return {self.table: rows, **imported} if imported else rows

    def _imports(self, rows: pa.Table) -> tuple[pa.Table, dict[str, pa.Table]]:
        """The images rows to write (not those of images stored before), and the new side rows."""
        sides = [json.loads(s) for s in rows.column("_side").to_pylist() if s]
        rows = rows.drop_columns(["_side"])
        known = pc.equal(rows.column("status"), "known")
        if pc.any(known).as_py():  # (a filter copies every image's bytes: only when it drops rows)
            rows = rows.filter(pc.invert(known))
        if not sides:
            return rows, {}
        if self._sides is None:
            self._sides = SideImports(self._ds)
        return rows, self._sides.tables(sides)


def ingest(sources: list[str], ds: Dataset, show_progress: bool = True, engine: str = "local",
           ray_address: str | None = None, sidecar_text: str = "auto", caption_column: str | None = None,
           tags_column: str | None = None, reference: bool = False) -> Summary:
    if sidecar_text not in TEXT_READINGS:
        raise ValueError(f"sidecar_text must be one of {', '.join(TEXT_READINGS)}, not {sidecar_text!r}")
    try:
        check_sources(sources, caption_column, tags_column)
        stage = IngestStage(sources, sidecar_text, caption_column, tags_column, reference)
        return run(ds, stage, engine=engine, ray_address=ray_address, show_progress=show_progress)[0]
    finally:
        release()  # the Hugging Face datasets read in this process
