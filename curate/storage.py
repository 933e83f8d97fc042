"""Where bytes live: a local path or an object in S3-compatible storage (`s3://bucket/key`),
both behind one pyarrow filesystem, and reading a referenced image back at its source.

The S3 endpoint comes from the usual AWS environment (`AWS_ENDPOINT_URL[_S3]`, keys, region);
`curate --endpoint-url` sets it for the command and every process it starts (Ray workers too).
DuckDB reads s3:// parts through the same filesystem, registered into the connection: its own
httpfs extension would have to be downloaded at run time, which a machine without internet
(or a pinned DuckDB newer than the published extension) cannot do.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs as pafs

S3 = "s3://"
# The locator columns of a referenced image (images table): where its bytes are, and what the file
# there measured when it was ingested.
LOCATOR_COLUMNS = ("location", "location_offset", "location_size", "location_mtime_ns")


# What a process needs to reach the same object storage: a Ray worker on another machine gets these
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def storage_env() -> dict[str, str]:
    """This process's object storage settings (AWS_VARIABLES that are set)."""
    return {k: os.environ[k] for k in AWS_VARIABLES if k in os.environ}


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location`, and its path there (a bucket/key for S3, absolute locally)."""
    import pyarrow.fs as pafs

    location = str(location)
    if is_remote(location):
        return _s3(storage_endpoint(), _region()), location[len(S3):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(location)


def storage_endpoint() -> str | None:
    """The S3 endpoint this process reaches (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=4)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    options = {}
    if endpoint:
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options = {"endpoint_override": url.netloc, "scheme": url.scheme}
    # Delayed open: a part smaller than a multipart chunk is one PutObject, written whole or not at all
    return pafs.S3FileSystem(region=region, allow_delayed_open=True, **options)


def upload(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Put a local file as one object that appears whole or not at all; OSError if it did not.

    Arrow puts an object under its part size (10 MiB, fixed in its C++ code) with one PutObject at
    close, a larger one as a multipart upload that close completes. Not pyarrow.fs.copy_files: it
    waits for the upload but drops how it ended, so a failed PutObject or completion passed as
    done. A stream that is dropped is closed, not aborted (it would complete an upload of what it
    was given so far): so the file goes in one write, which a Ctrl-C cannot split, and a write
    that failed (the multipart upload could not begin) is closed here, which puts what the stream
    holds (nothing) under the name, and that empty object is removed. (Left to be dropped, that
    close stalled for ~10 s.)"""
    import pyarrow as pa

    with pa.memory_map(str(local)) as source:
        stream = fs.open_output_stream(path)
        try:
            stream.write(source.read_buffer())
        except OSError:
            with contextlib.suppress(OSError):
                stream.close()
                fs.delete_file(path)
            raise
        stream.close()  # the PutObject, or the completion of the multipart upload


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The location of a path on a filesystem from `filesystem` (what DuckDB and pyarrow's URI
    resolution read)."""
    import pyarrow.fs as pafs

    return path if isinstance(fs, pafs.LocalFileSystem) else S3 + path


def duckdb_filesystem() -> fsspec.AbstractFileSystem:
    """This process's S3 filesystem as fsspec, for DuckDB's register_filesystem: it then reads
    s3:// paths through it.

    DuckDB asks for a file's size twice and its time once per file and query (a HEAD request
    each), and reads only the dataset's parts through it, which never change once they have their
    name: the answers are kept for the life of the process."""
    return _duckdb_filesystem(storage_endpoint(), _region())


@functools.lru_cache(maxsize=4)
def _duckdb_filesystem(endpoint: str | None, region: str | None) -> fsspec.AbstractFileSystem:
    from fsspec.implementations.arrow import ArrowFSWrapper

    class S3Paths(ArrowFSWrapper):
        protocol = ("s3",)
        known: dict[str, dict] = {}

        def info(self, path, **kwargs):
            path = self._strip_protocol(path)
            if path not in self.known:  # a missing one raises, and is asked again next time
                self.known[path] = super().info(path, **kwargs)
            return self.known[path]

        def modified(self, path):
            return self.info(path)["mtime"]

    return S3Paths(_s3(endpoint, region))


def list_files(location: str) -> Iterator[str]:
    """Every object under an s3:// prefix (or the object itself), in key order."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield location
        return
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    yield from sorted(uri(fs, i.path) for i in infos if i.type == pafs.FileType.File)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def stat(location: str) -> tuple[int, int]:
    """(size, modification time in ns) of the file or object at `location`."""
    import pyarrow.fs as pafs

    from curate.images import ImageError  # here: `curate sql` imports the store, and must start without PIL

    fs, path = filesystem(location)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ImageError("unreadable", f"cannot stat: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise ImageError("source_missing", f"{location} does not exist")
    if info.type != pafs.FileType.File:
        raise ImageError("not_regular_file", "not a regular file")
    return info.size, info.mtime_ns


def read_object(location: str, offset: int = 0, size: int | None = None) -> bytes:
    """An object's bytes (or `size` bytes from `offset`), under the decoder's size cap."""
    from curate.images import MAX_FILE_BYTES as max_bytes
    from curate.images import ImageError

    fs, path = filesystem(location)
    try:
        with fs.open_input_file(path) as f:
            length = f.size() - offset if size is None else size
            if length > max_bytes:
                raise ImageError("too_large", f"{length} bytes is over the cap of {max_bytes}")
            return f.read_at(length, offset)
    except FileNotFoundError:
        raise ImageError("source_missing", f"{location} does not exist") from None
    except OSError as e:
        raise ImageError("unreadable", f"cannot read: {e}") from None


def holds_image():
    """The filter of the images rows that hold an image: its bytes, or a locator where they are
    (each image has one such row; a duplicate's other rows hold neither)."""
    import pyarrow.compute as pc

    return pc.field("bytes").is_valid() | pc.field("location").is_valid()


def image_data(row: dict) -> bytes | memoryview:
    """The bytes of an images row that holds its image (see holds_image)."""
    return row["bytes"] if row["bytes"] is not None else read_referenced(row)


def read_referenced(row: dict) -> bytes:
    """A referenced image's bytes, read at its source and checked to be the bytes ingest saw.

    The file's size and modification time must be those recorded (a stat: a moved, truncated or
    rewritten file is refused before a byte is read), and the bytes must hash to the image_id
    (sha256: about 0.6 ms per MB, a few percent of decoding; it catches a rewrite that kept size
    and time). Either failure is an ImageError, never pixels of another image."""
    from curate.images import ImageError

    location = row["location"]
    size, mtime_ns = stat(location)
    if (size, mtime_ns) != (row["location_size"], row["location_mtime_ns"]):
        raise ImageError("source_changed", f"{location} changed since ingest (size {row['location_size']} -> {size}, "
                                           "or its modification time)")
    data = read_object(location, row["location_offset"] or 0, row["size_bytes"])
    if len(data) != row["size_bytes"] or hashlib.sha256(data).hexdigest() != row["image_id"]:
        raise ImageError("source_changed", f"{location} holds other bytes than at ingest")
    return data
