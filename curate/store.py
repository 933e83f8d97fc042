"""The dataset store: a directory of tables of append-only Parquet parts, and SQL over them.

A part becomes visible atomically: it is written under a temporary name and renamed to
`part-*.parquet` only when complete, so a reader never sees half a part, and a process
killed anywhere leaves at most a temporary file that the next writer removes. `PartWriter`
buffers a run's rows into parts of a bounded size and age, so a kill loses little work.

A dataset can live in object storage (`s3://bucket/prefix`, curate.storage). S3 has no rename,
but an object becomes visible whole or not at all when its upload completes (one PUT, or the
completion of a multipart upload): a part is written to a local temporary file and uploaded
under its final name, so a process killed before the upload completes leaves nothing to list.
DuckDB reads the parts through the same pyarrow filesystem, registered into each connection.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from curate.claims import ClaimError, Claims, Owner, pid_running
from curate.progress import warn
from curate.schema import MANIFEST_COLUMNS, MANIFEST_SOURCES, TABLES, arrow_schemas, duckdb_type
from curate.storage import duckdb_filesystem, filesystem, is_remote, storage_endpoint, upload, uri

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

PART_GLOB = "part-*.parquet"
TMP_PREFIX = ".tmp-"
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 32 << 20  # fewer rows per group when rows are big (image bytes, SDXL latents): readers stream groups
READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
QUIET = "SET enable_progress_bar = false"  # DuckDB draws its own bar on long queries, into our output
# Rows per part: bounds the work lost to a kill (CURATE_PART_ROWS overrides it, e.g. in tests).
PART_ROWS = int(os.environ.get("CURATE_PART_ROWS", "2048"))
PART_SECONDS = 60.0  # and so does time, for slow stages
PART_BYTES = 1 << 30  # and a part of image bytes is cut at 1 GiB (streamed to disk: memory holds a row group)
# Columns that hold already-compressed media (image files): zstd, dictionary encoding and
# min/max statistics would burn CPU on them to save nothing.
RAW_COLUMNS = {"images": {"bytes"}}
# Large binary values that do compress (float16 latents): zstd, but no dictionary or statistics.
BLOB_COLUMNS = {"latents": {"latent", "mean", "logvar"}}


class DatasetError(Exception):
    """A user-facing problem with a dataset directory or a query over it."""


def write_error(e: OSError, what: str, folder: Path) -> DatasetError:
    """An error writing to the dataset, said in one line: a full disk with the free space
    left, a read-only dataset, or the OS's own words."""
    code = e.errno or (errno.ENOSPC if "No space left" in str(e) else None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return DatasetError(f"the disk is full: no space left writing {what} in {folder} ({free}); free some "
                            "space and run the command again: it goes on from where it stopped")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DatasetError(f"cannot write {what} in {folder}: {os.strerror(code)} (a read-only dataset can be "
                            "read with sql, info and dups)")
    return DatasetError(f"cannot write {what} in {folder}: {e}")


def where_clause(where: str) -> str:
    """A user's `--where` (or the trainer's `where`) as SQL to put after WHERE: exactly one
    expression, as DuckDB's own parser reads it, never a statement. What it may read is
    limited by the connection (`Dataset.connect`): the dataset's tables and nothing else."""
    import duckdb

    try:
        duckdb.SQLExpression(where)
    except duckdb.Error as e:
        raise DatasetError(f"bad --where {where!r}: give one SQL expression over the manifest's columns, such as "
                           f"\"rank >= 5 AND NOT has_watermark\" ({str(e).splitlines()[0]})") from None
    # Its own lines: a trailing -- comment ends at the newline, before the closing parenthesis.
    return f"(\n{where}\n)"


class Rows(NamedTuple):
    """A query's result as Python values, made without pyarrow (`curate sql` and `info` start
    faster without it): the column names and one tuple per row."""

    columns: list[str]
    rows: list[tuple]

    def to_pylist(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def now() -> datetime:
    return datetime.now(timezone.utc)


class Dataset:
    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.remote = is_remote(root)
        self._listed: dict[str, tuple[int, list[Path]]] = {}  # table -> (its folder's mtime, its parts)
        if self.remote:  # root and the part paths are s3:// locations (str)
            self.fs, path = filesystem(root)
            self.root, self.tables_dir = uri(self.fs, path), uri(self.fs, path + "/tables")
            self._open_remote(path + "/tables", create, root)
            return
        self.root = Path(root).resolve()
        self.tables_dir = self.root / "tables"
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{root} is a file, not a dataset directory; give a directory (a new one for "
                               "`curate ingest` to make)")
        if create:
            try:
                self.tables_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, "the dataset's tables/ folder", self.root) from None
        elif not self.tables_dir.is_dir():
            raise DatasetError(f"{self.root} is not a curate dataset (no tables/ folder); "
                               f"run `curate ingest SRC {root}` first")

    def _open_remote(self, tables: str, create: bool, root) -> None:
        import pyarrow.fs as pafs

        try:
            if create:
                self.fs.create_dir(tables)
            elif self.fs.get_file_info(tables).type == pafs.FileType.NotFound:
                raise DatasetError(f"{root} is not a curate dataset (nothing under tables/); "
                                   f"run `curate ingest SRC {root}` first")
        except OSError as e:  # no such bucket, no access, no endpoint
            raise DatasetError(f"cannot open {root}: {e}") from None

    # ---- parts -------------------------------------------------------------------
    def table_dir(self, name: str) -> Path | str:
        return f"{self.tables_dir}/{name}" if self.remote else self.tables_dir / name

    def parts(self, name: str) -> list[Path]:
        """The table's parts in write order: complete ones, and of the table's schema.

        A part is only ever renamed into place whole, so a part that ends in a Parquet footer
        is complete: reading its last 8 bytes is enough, where parsing every footer would
        cost seconds for the tens of thousands of parts of a 1.5M-image dataset. A part's name
        carries a tag of the schema it was written with (`schema_tag`); a part without its
        table's tag (another table's part, one dropped in by another tool) has its schema read,
        and one that is not the table's (other columns, a column of another type), or damaged,
        is never read as rows: it is skipped with a warning naming it (`unread_parts` lists them).
        An object in object storage is complete once it is listed (see the module's docstring);
        there, a part without its table's schema tag is skipped the same way."""
        if self.remote:
            return self._readable(name, self._part_files(name))
        folder = self.table_dir(name)
        try:
            changed = os.stat(folder).st_mtime_ns
            if self._listed.get(name, (None,))[0] == changed:
                return list(self._listed[name][1])
            names = sorted(entry.name for entry in os.scandir(folder) if fnmatch(entry.name, PART_GLOB))
        except (FileNotFoundError, NotADirectoryError):
            return []
        parts = self._readable(name, [folder / n for n in names if _ends_in_footer(folder / n)])
        # A listing is reused while the folder is unchanged; not if it changed in the last second,
        # when a part renamed in later could leave its time stamp as it was (coarse clocks).
        if time.time_ns() - changed > 1e9:
            self._listed[name] = (changed, parts)
        return list(parts)

    @staticmethod
    def _readable(name: str, paths: list) -> list:
        """The paths that are parts of this table; each other one is named in a warning, once."""
        parts = []
        for path in paths:
            problem = checked_part(path, name)
            if problem is None:
                parts.append(path)
            elif path not in _WARNED:
                _WARNED.add(path)
                warn(f"{path} is not read: {problem}")
        return parts

    def unread_parts(self) -> list[tuple[str, Path, str]]:
        """(table, part, why) for every part a reader skips: damaged, or not the table's schema."""
        return [(name, path, problem) for name in TABLES for path in self._part_files(name)
                if (problem := checked_part(path, name)) is not None]

    def part_bytes(self, name: str) -> int:
        """The size of a table's parts, in bytes (for a dataset in object storage, from one listing)."""
        if self.remote:
            sizes = self._part_sizes(name)
            return sum(sizes[part] for part in self.parts(name))
        return sum(os.stat(part).st_size for part in self.parts(name))

    def _part_sizes(self, name: str) -> dict[str, int]:
        """Every object named as a part in a remote table's folder, with its size."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(filesystem(self.table_dir(name))[1], allow_not_found=True)
        listed = self.fs.get_file_info(selector)
        return {uri(self.fs, i.path): i.size for i in listed if fnmatch(i.base_name, PART_GLOB)}

    def _part_files(self, name: str) -> list[Path] | list[str]:
        folder = self.table_dir(name)
        if self.remote:
            return sorted(self._part_sizes(name))
        return sorted(folder.glob(PART_GLOB)) if folder.is_dir() else []

    def write_part(self, name: str, table: pa.Table | dict) -> Path | None:
        """Write rows as one new part, atomically. Returns the part's path (None if no rows)."""
        table = conformed(table, schema_of(name))
        if table.num_rows == 0:
            return None
        part = PartFile(self, name)
        part.write(table, max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes))))
        return part.publish()

    def _next_stamp(self, name: str) -> int:
        """A new part's time stamp: now, but after every part already there, so parts sort in
        the order they were written even when writers' clocks differ (machines sharing the
        dataset): a row that refers to an earlier one (an exact duplicate whose bytes are
        stored elsewhere) always comes after it."""
        names = [part_name(p) for p in self._part_files(name)]
        stamps = [int(n.split("-")[1]) for n in names if n.split("-")[1].isdigit()]
        return max([time.time_ns(), *(s + 1 for s in stamps)])

    def remove_stale_tmp(self, name: str) -> None:
        """Remove temporary parts left by processes that no longer run."""
        remove_stale_temporaries(self.staging_dir(name))

    def staging_dir(self, name: str) -> Path:
        """Where a part is written before it is published: beside the parts, or for a remote
        dataset in a local folder it is uploaded from."""
        return Path(tempfile.gettempdir()) / "curate-parts" if self.remote else self.table_dir(name)

    # ---- claims on work (curate/claims.py) --------------------------------------------
    @contextmanager
    def owner(self) -> Iterator[Owner]:
        """This run, for claiming work: its record lives while the block runs."""
        owner = Owner(self.claims_root)
        try:
            owner.start()
        except ClaimError as e:
            raise write_error(e, "this run's record", owner.folder_root) from None
        try:
            yield owner
        finally:
            owner.stop()

    def claims(self, table: str, model: str, owner: Owner | str) -> Claims:
        """Claims on the units of one stage's work, made for `owner` (a run, or its id)."""
        return Claims(str(self.claims_root), table, model, owner if isinstance(owner, str) else owner.id)

    @property
    def claims_root(self) -> Path:
        """Where claims live: in the dataset; for one in object storage (no atomic create or link
        there) in a local folder, so they hold between the runs of one machine only."""
        if not self.remote:
            return self.root
        return Path(tempfile.gettempdir()) / "curate-claims" / self._local_key()

    @property
    def cache_dir(self) -> Path:
        """Where curate keeps what it derives from the tables (the stage join that the view, the
        report and the trainer read; thumbnails): DS/cache; for a dataset in object storage a
        local folder, `$XDG_CACHE_HOME/curate/<hash of endpoint and location>` (~/.cache by
        default), so they are read from disk, not with a request each. Safe to delete."""
        if not self.remote:
            return self.root / "cache"
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curate" / self._local_key(
            storage_endpoint())

    @property
    def name(self) -> str:
        """The dataset's folder name (the last part of its s3:// prefix)."""
        return part_name(self.root)

    def _local_key(self, *more: str | None) -> str:
        """A local folder name for this remote dataset."""
        return hashlib.sha256("\n".join([str(self.root), *map(str, more)]).encode()).hexdigest()[:16]

    # ---- reading -----------------------------------------------------------------
    def read(self, name: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        import pyarrow as pa

        return pa.Table.from_batches(list(self.scan(name, columns, filter)), schema=self._schema(name, columns))

    def scan(self, name: str, columns: list[str] | dict | None = None, filter=None, batch_size: int = 256,
             use_threads: bool = True, ids: set[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a table's rows in batches, reading only the columns asked for (or a
        projection: name -> expression), on Arrow's threads unless use_threads is False.

        ids: read only the row groups that hold one of these image ids. Passes work in
        storage order, so a resumed pass skips the groups it finished without reading their
        image bytes."""
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        parts = self.parts(name)
        if not parts:
            return
        parquet = _parquet_format(self.remote)
        fs = self.fs if self.remote else pafs.LocalFileSystem()
        if ids is None:
            data = pads.dataset([filesystem(p)[1] for p in parts], schema=schema_of(name), format=parquet,
                                filesystem=fs)
        else:
            data = pads.FileSystemDataset([parquet.make_fragment(filesystem(part)[1], fs, row_groups=groups)
                                           for part, groups in row_groups_holding(parts, ids)],
                                          schema_of(name), parquet, fs)
        yield from data.to_batches(columns=columns, filter=filter, batch_size=batch_size, use_threads=use_threads)

    def scan_part(self, name: str, part: Path | str, columns: list[str] | dict, row_groups: list[int] | None = None,
                  batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream one part's rows (only `row_groups` when given) on this thread, as `scan` does."""
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        fs = self.fs if self.remote else pafs.LocalFileSystem()
        (fragment,) = pads.dataset([filesystem(part)[1]], schema=schema_of(name), format=_parquet_format(self.remote),
                                   filesystem=fs).get_fragments()
        if row_groups is not None:
            fragment = fragment.subset(row_group_ids=row_groups)
        scanner = pads.Scanner.from_fragment(fragment, schema=schema_of(name), columns=columns, batch_size=batch_size,
                                             use_threads=False)
        yield from scanner.to_batches()

    def _schema(self, name: str, columns: list[str] | None) -> pa.Schema:
        import pyarrow as pa

        schema = schema_of(name)
        return schema if columns is None else pa.schema([schema.field(c) for c in columns])

    # ---- SQL ---------------------------------------------------------------------
    def connect(self, tables: set[str] | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a view per table and the `manifest` view (or views
        of the given tables only: listing every table's parts takes a while at 1.5M images),
        that reads the dataset's parts and nothing else: no other file (read_text, read_csv,
        glob), no writes (COPY), no ATTACH, no extensions installed or loaded, and its settings
        locked (cache_dir, curate's own derived files, may be read and written). A user's
        `--where` and `curate sql` run on it."""
        parts = {name: self.parts(name) for name in TABLES if tables is None or name in tables}
        con = guarded_connection([p for table in parts.values() for p in table], [self.cache_dir], self.remote)
        try:
            for sql in self.view_sql(tables, parts):
                con.execute(sql)
        except BaseException:
            con.close()
            raise
        return con

    def view_sql(self, tables: set[str] | None = None, parts: dict[str, list[Path]] | None = None) -> list[str]:
        """A view per table and the manifest's; or views of the given tables only."""
        parts = parts or {}
        views = [self.table_view_sql(name, parts.get(name)) for name in TABLES if tables is None or name in tables]
        return views if tables is not None else views + manifest_view_sql()

    def table_view_sql(self, name: str, parts: list[Path] | None = None) -> str:
        """A view of a table's parts as they are now (a typed empty view when it has none)."""
        parts = self.parts(name) if parts is None else parts
        if parts:
            # Every part has its table's columns in the schema's order (writers conform rows to
            # it, and parts() leaves out any other), so DuckDB may take the first part's schema
            # for all; union_by_name would read every footer to unify them, seconds at the tens
            # of thousands of parts of 1.5M images.
            return f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet({_file_list(parts)})'
        return f'CREATE OR REPLACE VIEW "{name}" AS {empty_select(name)}'

    def refresh_manifest_db(self) -> Path:
        """Write manifest.duckdb: the same views, for DuckDB clients outside curate.

        Written aside, checked and renamed, so a client that has the old file open keeps
        reading it, two refreshes never fight over DuckDB's file lock, and a refresh that
        fails (a full disk, a read-only dataset) keeps the previous file.
        """
        self._refreshed_manifest().close()
        return self.root / "manifest.duckdb"

    def _refreshed_manifest(self) -> duckdb.DuckDBPyConnection:
        """refresh_manifest_db's work; the new file stays open, read-only, as a connection
        guarded as `connect`'s are (the check that it reads): `sql` runs its query on it
        rather than start a third DuckDB instance (tens of ms each) and create the views again."""
        import duckdb

        path = self.root / "manifest.duckdb"
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.duckdb"
        parts = {name: self.parts(name) for name in TABLES}
        try:
            remove_stale_temporaries(self.root)  # left by a killed refresh
            con = duckdb.connect(str(tmp))
            try:
                for sql in self.view_sql(None, parts):
                    con.execute(sql)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            # DuckDB may not say that its writes failed: the file must read back
            check = guarded_connection([p for table in parts.values() for p in table], [self.cache_dir],
                                       database=tmp)
            try:
                check.execute("SELECT * FROM manifest LIMIT 0")
                os.replace(tmp, path)
            except BaseException:
                check.close()
                raise
        except (OSError, duckdb.Error) as e:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass
            error = write_error(e, "manifest.duckdb", self.root) if isinstance(e, OSError) else e
            raise DatasetError(f"{error}; the previous manifest.duckdb is kept") from None
        return check

    def sql(self, sql: str, rows: bool = False) -> pa.Table | Rows:
        """Run one read-only query (SELECT or EXPLAIN) over the tables and `manifest`, on a
        connection that reads nothing but the dataset; the result as an Arrow table, or with
        `rows` as Python values. manifest.duckdb is refreshed first for other DuckDB clients
        (and the query runs on it); where that fails (a full disk, a read-only dataset) the
        query still runs, with a warning."""
        import duckdb

        con = None
        try:
            if not self.remote:  # a remote dataset has none: its views need the filesystem registered
                con = self._refreshed_manifest()
        except DatasetError as e:
            warn(f"manifest.duckdb was not refreshed: {e}")
        con = con or self.connect()
        try:
            statements = con.extract_statements(sql)
            if len(statements) != 1:
                raise DatasetError(f"give exactly one query; got {len(statements)} statements")
            kind = statements[0].type.name
            # The connection is read-only, but DuckDB would still run COPY ... TO a file,
            # INSTALL, ATTACH or SET: only queries get through.
            if kind not in READ_ONLY_STATEMENTS:
                raise DatasetError(f"curate sql is read-only: a {kind} statement is refused; give a SELECT query")
            return _result(con.sql(sql), rows)
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def query(self, sql: str, rows: bool = False, tables: set[str] | None = None) -> pa.Table | Rows:
        """Run a query over the tables and the manifest (or over the given tables only)."""
        import duckdb

        con = self.connect(tables)
        try:
            return _result(con.sql(sql), rows)
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def query_manifest(self, sql: str, tables: set[str] = frozenset(), cached: bool = False) -> pa.Table:
        """A query over `manifest` (and these tables), the manifest joined here with only the stage
        tables whose columns the query names (all of them for a `*`): each join reads every part
        of its table, tens of thousands at 1.5M images. With `cached`, the stage tables are read
        from their join kept in cache_dir (stage_manifest), made now if parts came since: a
        second read costs seconds at 1.5M images where the join costs tens (the trainer's start)."""
        import duckdb

        if cached:  # a connection that reads the kept join and the edits, or every table to make it
            kept = self.stage_manifest_file()
            con = self.connect(tables | {"edits"} if kept.exists() else None)
            base = self.stage_manifest(con)
        else:
            joined = set(MANIFEST_COLUMNS) if "*" in sql else tables_for(sql)
            con = self.connect(joined | tables | {"images", "edits"})
            base = f"({stage_manifest_sql(joined)})"
        manifest = (f"WITH manifest_all AS ({edited_manifest_sql(base)}), "
                    "manifest AS (SELECT * EXCLUDE (excluded) FROM manifest_all WHERE NOT excluded) ")
        try:
            return _result(con.sql(manifest + sql), False)
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def stage_manifest_file(self) -> Path:
        """Where the join of the stage tables as they are now is kept (stage_manifest): named by a
        hash of the join's SQL and its parts' names."""
        names = [f"{name}/{part_name(p)}" for name in ["images", *MANIFEST_COLUMNS] for p in self.parts(name)]
        key = hashlib.sha256(chr(10).join([stage_manifest_sql(), *names]).encode()).hexdigest()[:16]
        return self.cache_dir / f"manifest-{key}.parquet"

    def stage_manifest(self, con: duckdb.DuckDBPyConnection) -> str:
        """The manifest without edits (stage_manifest_sql) as a relation for `con`: a Parquet file
        in cache_dir (local also for a dataset in object storage), made once per set of parts.
        Parts are never rewritten, so their names say whether the join is still current (edits
        are applied over it, so they never make it stale). Joining every stage table costs ~20 s
        at 1.5M images on 2 cores, reading the file back ~3 s. A dataset that cannot be written
        to gets the join in memory instead."""
        import duckdb

        sql, path = stage_manifest_sql(), self.stage_manifest_file()
        if not path.exists():
            tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.parquet")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(path.parent)  # left by a killed join
                for name in ["images", *MANIFEST_COLUMNS]:
                    con.execute(self.table_view_sql(name))
                con.execute(f"COPY ({sql}) TO {_quote(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
                os.replace(tmp, path)
            except (OSError, duckdb.IOException, duckdb.PermissionException):
                tmp.unlink(missing_ok=True)  # a full disk, a read-only dataset
                return f"({sql})"
            for old in path.parent.glob("manifest-*.parquet"):
                if old != path:
                    old.unlink(missing_ok=True)
        return f"read_parquet({_quote(str(path))})"

    def select_ids(self, where: str | None = None, undone: tuple[str, str] | None = None) -> list[str]:
        """Ids of ok images, optionally filtered by a SQL predicate over `manifest` (without one
        only the images table is read); with undone=(table, model), only those that have no row
        of that model in that table (a stage's to-do)."""
        conditions = [where_clause(where)] if where else []
        if undone:
            model = undone[1].replace("'", "''")
            conditions.append(f"image_id NOT IN (SELECT image_id FROM \"{undone[0]}\" WHERE model = '{model}')")
        sql = "SELECT image_id FROM manifest" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        try:
            return self.query_manifest(sql + " ORDER BY image_id", {undone[0]} if undone else set()).column(
                "image_id").to_pylist()
        except DatasetError as e:
            raise DatasetError(f"bad --where {where!r}: {e}. Columns: {', '.join(self.manifest_columns())}") from None

    def select(self, where: str | None, columns: list[str]) -> pa.Table:
        """Manifest rows of ok images (these columns; `["*"]` all), optionally filtered by a SQL
        predicate over `manifest`, in image_id order."""
        sql = f"SELECT {', '.join(columns)} FROM manifest" + (f" WHERE ({where})" if where else "")
        try:
            return self.query_manifest(sql + " ORDER BY image_id")
        except DatasetError as e:
            raise DatasetError(f"bad --where {where!r}: {e}. Columns: {', '.join(self.manifest_columns())}") from None

    def manifest_columns(self) -> list[str]:
        con = self.connect()
        try:
            return [row[0] for row in con.execute("DESCRIBE manifest").fetchall()]
        finally:
            con.close()


_WARNED: set[Path] = set()  # parts already warned about in this process
_CHECKED: dict[Path, str | None] = {}  # part -> its problem: a part never changes once it has its name


def guarded_connection(paths: list[Path] = (), directories: list[Path] = (), remote: bool = False,
                       database: Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (or one on `database`, read-only) that reads and writes
    only these files and directories: no other file, no ATTACH of another, no extension
    installed or loaded, settings locked. With `remote`, s3:// paths are read through
    pyarrow's filesystem (httpfs cannot be installed offline)."""
    import duckdb

    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if database is not None:  # a query that spills goes where an in-memory connection's does, not into the dataset
        config["temp_directory"] = ".tmp"
    con = duckdb.connect(str(database or ":memory:"), read_only=database is not None, config=config)
    try:
        con.execute(QUIET)
        if remote:
            con.register_filesystem(duckdb_filesystem())
        con.execute(f"SET allowed_paths = [{', '.join(_quote(str(p)) for p in paths)}]")
        con.execute(f"SET allowed_directories = [{', '.join(_quote(str(d) + os.sep) for d in directories)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def checked_part(path: Path | str, table: str) -> str | None:
    """part_problem, asked once per part and process (a pass lists a table's parts often), and
    only of a part whose name lacks its table's schema tag: curate names what it writes. In
    object storage such a part is not read (its schema would cost a request per part)."""
    if str(path).endswith(f"-{schema_tag(table)}.parquet"):
        return None
    if isinstance(path, str):
        return "not named with this table's schema tag (not written by curate for this table)"
    if path not in _CHECKED:
        _CHECKED[path] = part_problem(path, schema_of(table))
    return _CHECKED[path]


@functools.cache
def schema_tag(table: str) -> str:
    """A short hash of a table's columns and types, in the name of each part curate writes."""
    return hashlib.sha256(repr((table, TABLES[table])).encode()).hexdigest()[:8]


def _parquet_format(remote: bool = False):
    import pyarrow.dataset as pads

    # Arrow's pre-buffering (made for object stores, and kept for them) reads whole row groups
    # into fresh memory first, which for local image bytes cost 2-10x the read itself.
    return pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=remote))


def part_problem(path: Path, schema: pa.Schema) -> str | None:
    """Why a part is not one of its table's (None: it is): unreadable, a column the table
    does not have or of another type, or a required column missing. Columns added to a table
    later may be missing from older parts (they read as null)."""
    import pyarrow.parquet as pq

    try:
        found = pq.read_schema(path)
    except Exception as e:  # a damaged part must not hide the rest of the table
        return f"unreadable ({type(e).__name__}: {e})"
    for field in found:
        if schema.get_field_index(field.name) < 0:
            return f"column {field.name!r} is not in this table's schema (a part of another table?)"
        expected = schema.field(field.name).type
        if not _same_type(field.type, expected):
            return f"column {field.name!r} is {field.type}, not {expected}"
    missing = [f.name for f in schema if not f.nullable and found.get_field_index(f.name) < 0]
    if missing:
        return f"lacks the column(s) {', '.join(missing)}"
    return None


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Equal types, counting large and small strings, binaries and lists as the same."""
    import pyarrow as pa

    if a == b:
        return True
    for kind, large in ((pa.types.is_string, pa.types.is_large_string), (pa.types.is_binary, pa.types.is_large_binary)):
        if (kind(a) or large(a)) and (kind(b) or large(b)):
            return True
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(f(a) for f in lists) and any(f(b) for f in lists):
        return _same_type(a.value_type, b.value_type)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        return [f.name for f in a] == [f.name for f in b] and all(_same_type(x.type, y.type) for x, y in zip(a, b))
    return False


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files (`.tmp-<pid>-*`) in `folder` of processes that no longer run."""
    for tmp in folder.glob(TMP_PREFIX + "*"):
        match = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", tmp.name)
        if match and not pid_running(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def row_groups_holding(parts: list[Path], ids: set[str]) -> list[tuple[Path, list[int]]]:
    """(part, its row groups that hold one of the ids), in write order. DuckDB finds the rows by
    reading the image_id column of every part at once (ids are hashes: row-group statistics
    never rule a group out); only the parts that hold any have their row groups counted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    con = guarded_connection(parts, remote=is_remote(parts[0]))
    try:
        con.register("wanted", pa.table({"image_id": pa.array(sorted(ids), pa.string())}))
        rows = dict(con.sql(f"SELECT filename, list(file_row_number) FROM read_parquet({_file_list(parts)}, "
                            "filename=true, file_row_number=true) WHERE image_id IN (SELECT image_id FROM wanted) "
                            "GROUP BY filename").fetchall())
    finally:
        con.close()
    holding = []
    for part in parts:
        if str(part) in rows:
            meta = pq.read_metadata(part)
            starts = np.cumsum([meta.row_group(k).num_rows for k in range(meta.num_row_groups)])
            holding.append((part, sorted(set(np.searchsorted(starts, rows[str(part)], side="right").tolist()))))
    return holding


def part_name(part: Path | str) -> str:
    """A part's file name, of a local path or an s3:// location."""
    return str(part).rsplit("/", 1)[-1]


def _file_list(parts: list[Path]) -> str:
    """Paths as a DuckDB list literal."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts) + "]"


def _ends_in_footer(path: Path) -> bool:
    """Whether the file ends as a Parquet file does: a footer length that fits, then PAR1."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 12:
                return False
            f.seek(size - 8)
            tail = f.read(8)
    except OSError:
        return False
    return tail[4:] == b"PAR1" and int.from_bytes(tail[:4], "little") + 12 <= size


def _result(relation: duckdb.DuckDBPyRelation, rows: bool) -> pa.Table | Rows:
    return Rows(relation.columns, relation.fetchall()) if rows else relation.to_arrow_table()


def schema_of(table: str) -> pa.Schema:
    return arrow_schemas()[table]


def manifest_view_sql() -> list[str]:
    """`manifest_all`: every ok image with the results of every stage and the hand edits
    applied, and an `excluded` column; `manifest`: the images that are not excluded, without
    that column. Every stage's input, every --where and the trainer read `manifest`."""
    return [f"CREATE OR REPLACE VIEW manifest_all AS {edited_manifest_sql(f'({stage_manifest_sql()})')}",
            "CREATE OR REPLACE VIEW manifest AS SELECT * EXCLUDE (excluded) FROM manifest_all WHERE NOT excluded"]


def stage_manifest_sql(tables: set[str] | None = None) -> str:
    """One row per ok image, joined with the latest ok row of every stage table (no edits). With
    `tables` (see tables_for), the other stage tables are left out of the join (their columns are
    null): each join reads every part of its table, tens of thousands at 1.5M images."""
    selects = ["img.*"]
    joins = []
    for table, exprs in MANIFEST_COLUMNS.items():
        selects += exprs
        latest = MANIFEST_SOURCES.get(table, f'SELECT * FROM "{table}" WHERE status = \'ok\' '
                                             "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY created_at "
                                             "DESC) = 1")
        if tables is not None and table not in tables:
            # a table read through its own query: that query over an empty table of the same name
            latest = f'WITH "{table}" AS ({empty_select(table)}) {latest}' if table in MANIFEST_SOURCES \
                else empty_select(table)
        joins.append(f"LEFT JOIN ({latest}) AS {table} ON {table}.image_id = img.image_id")
    return (
        "WITH img AS ("
        "SELECT image_id, min(source) AS source, list(source ORDER BY source) AS sources, "
        "any_value(width) AS width, any_value(height) AS height, any_value(format) AS format, "
        "any_value(mode) AS mode, any_value(animated) AS animated, max(size_bytes) AS size_bytes "
        "FROM images WHERE status = 'ok' GROUP BY image_id) "
        f"SELECT {', '.join(selects)} FROM img {' '.join(joins)}"
    )


def empty_select(table: str) -> str:
    """No rows, with the table's columns and types."""
    cols = ", ".join(f'CAST(NULL AS {duckdb_type(c.type)}) AS "{c.name}"' for c in TABLES[table])
    return f"SELECT {cols} WHERE false"


def tables_for(predicate: str) -> set[str]:
    """The stage tables the manifest must join for a predicate: those whose columns it names, and
    those these columns' expressions read (`tags` reads watermarks too). A word that is not a
    column, or a column's name inside a string, only adds a join."""
    words = set(re.findall(r"[A-Za-z_]\w*", predicate))
    named = {table for table, exprs in MANIFEST_COLUMNS.items()
             if words & {e.rsplit(" AS ", 1)[1] if " AS " in e else e.rsplit(".", 1)[1] for e in exprs}}
    return named | {t for table in named for t in re.findall(r"\b(\w+)\.", " ".join(MANIFEST_COLUMNS[table]))
                    if t in MANIFEST_COLUMNS}


def edited_manifest_sql(base: str) -> str:
    """`base` (a relation with the stage manifest's columns) with the live hand edits applied
    (schema.EDIT_ACTIONS): the latest exclude/include, caption and add/remove of each tag win."""
    removed, added = "coalesce(t.removed, [])", "coalesce(t.added, [])"
    own = "coalesce(b.tags, CAST([] AS VARCHAR[]))"
    return (
        "WITH live AS (SELECT * FROM edits e WHERE action <> 'undo' AND NOT EXISTS "
        "(SELECT 1 FROM edits u WHERE u.action = 'undo' AND u.value = e.edit)), "
        "excl AS (SELECT image_id, arg_max(action, created_at) = 'exclude' AS excluded FROM live "
        "WHERE action IN ('exclude', 'include') GROUP BY image_id), "
        "cap AS (SELECT image_id, arg_max(value, created_at) AS caption FROM live WHERE action = 'caption' "
        "GROUP BY image_id), "
        "tag_state AS (SELECT image_id, value AS tag, arg_max(action, created_at) AS action FROM live "
        "WHERE action IN ('add_tag', 'remove_tag') GROUP BY image_id, value), "
        "t AS (SELECT image_id, list(tag ORDER BY tag) FILTER (WHERE action = 'add_tag') AS added, "
        "list(tag) FILTER (WHERE action = 'remove_tag') AS removed FROM tag_state GROUP BY image_id) "
        "SELECT b.* REPLACE ("
        f"CASE WHEN t.image_id IS NULL THEN b.tags ELSE list_concat("
        f"list_filter({own}, lambda x: NOT list_contains({removed}, x)), "
        f"list_filter({added}, lambda x: NOT list_contains({own}, x))) END AS tags, "
        "coalesce(c.caption, b.caption) AS caption, "
        f"CASE WHEN list_contains({removed}, 'watermark') THEN false "
        f"WHEN list_contains({added}, 'watermark') THEN true ELSE b.has_watermark END AS has_watermark, "
        f"CASE WHEN list_contains({removed}, 'watermark') THEN b.watermark_boxes[1:0] "
        "ELSE b.watermark_boxes END AS watermark_boxes), "
        "coalesce(x.excluded, false) AS excluded "
        f"FROM {base} AS b LEFT JOIN excl AS x ON x.image_id = b.image_id "
        "LEFT JOIN cap AS c ON c.image_id = b.image_id LEFT JOIN t ON t.image_id = b.image_id"
    )


def conformed(table: pa.Table | dict, schema: pa.Schema) -> pa.Table:
    """Rows as a table of exactly the schema's columns and types."""
    import pyarrow as pa

    if isinstance(table, dict):
        return pa.Table.from_pydict(table, schema=schema)
    return table.select(schema.names).cast(schema)


class PartFile:
    """A part being written: row groups go to a temporary file, which `publish` renames into
    place. A write that fails (a full disk, a read-only dataset) removes the temporary file and
    says so in one line (write_error): no partial part stays behind."""

    def __init__(self, ds: Dataset, table: str):
        import pyarrow.parquet as pq

        schema = schema_of(table)
        self.ds, self.table, self.folder = ds, table, ds.table_dir(table)
        self.staging = ds.staging_dir(table)
        self.tmp = self.staging / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.parquet"
        self.writer = None
        raw = RAW_COLUMNS.get(table, set())
        cooked = [c for c in schema.names if c not in raw | BLOB_COLUMNS.get(table, set())]
        with self._failing():
            self.staging.mkdir(parents=True, exist_ok=True)
            ds.remove_stale_tmp(table)
            self.writer = pq.ParquetWriter(self.tmp, schema, use_dictionary=cooked, write_statistics=cooked,
                                           compression={c: "none" if c in raw else "zstd" for c in schema.names})
        self.rows = self.bytes = 0

    def write(self, rows: pa.Table, row_group_rows: int | None = None) -> None:
        with self._failing():
            self.writer.write_table(rows, row_group_size=row_group_rows)
        self.rows += rows.num_rows
        self.bytes += rows.nbytes

    def publish(self) -> Path | str:
        """Close the file, make it durable and rename it into place (upload it under its name):
        readers see the whole part or none."""
        name = f"part-{self.ds._next_stamp(self.table):020d}-{uuid.uuid4().hex[:8]}-{schema_tag(self.table)}.parquet"
        with self._failing():
            self.writer.close()
            if self.ds.remote:
                final = f"{self.folder}/{name}"
                upload(self.tmp, self.ds.fs, filesystem(final)[1])
                self.tmp.unlink()
                return final
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.folder / name)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return self.folder / name

    def discard(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass  # the file goes anyway
        self.tmp.unlink(missing_ok=True)

    @contextmanager
    def _failing(self):
        try:
            yield
        except OSError as e:
            self.discard()
            raise write_error(e, f"a part of {self.table}", self.folder) from None


class PartWriter:
    """Writes one table's rows as they come. A part is streamed to its temporary file a row
    group at a time (at most ROW_GROUP_ROWS rows or ROW_GROUP_BYTES), so memory holds one row
    group, not a part (256 MiB of image bytes); it is renamed into place when it holds
    PART_ROWS rows or PART_BYTES bytes, or PART_SECONDS after it began. What was added is kept
    on exit, also on Ctrl-C.

    `before` is called before each part is published (it may refuse by raising), `written`
    once it is, with what `note(rows)` (given to add) said of each slice of rows in it."""

    def __init__(self, ds: Dataset, table: str, before: Callable[[], None] | None = None,
                 written: Callable[[list], None] | None = None):
        self.ds, self.table, self.schema = ds, table, schema_of(table)
        self.before, self.written = before, written
        self.notes: list = []  # what add() was told about the rows of the part being written
        self.group: list[pa.Table] = []  # rows of the next row group
        self.group_rows = self.group_bytes = 0
        self.part: PartFile | None = None
        self.started = time.monotonic()

    def add(self, table: pa.Table, note: Callable[[pa.Table], object] | None = None) -> None:
        table = conformed(table, self.schema)
        while table.num_rows:  # a model batch can be larger than a part, or a row group
            room = min(PART_ROWS - self._rows(), ROW_GROUP_ROWS - self.group_rows)
            head, table = table.slice(0, room), table.slice(room)
            self.group.append(head)
            if note is not None:
                self.notes.append(note(head))
            self.group_rows += head.num_rows
            self.group_bytes += head.nbytes
            if self.group_rows >= ROW_GROUP_ROWS or self.group_bytes >= ROW_GROUP_BYTES:
                self._write_group()
            if (self._rows() >= PART_ROWS or self._bytes() >= PART_BYTES
                    or time.monotonic() - self.started > PART_SECONDS):
                self.flush()

    def _rows(self) -> int:
        return self.group_rows + (self.part.rows if self.part else 0)

    def _bytes(self) -> int:
        return self.group_bytes + (self.part.bytes if self.part else 0)

    def _write_group(self) -> None:
        if self.group:
            import pyarrow as pa

            if self.part is None:
                self.part = PartFile(self.ds, self.table)
            self.part.write(pa.concat_tables(self.group))
        self.group, self.group_rows, self.group_bytes = [], 0, 0

    def flush(self) -> None:
        """Write what was added and publish the part."""
        self._write_group()
        if self.part is not None:
            if self.before:
                self.before()
            self.part.publish()
            self.part = None
            if self.written:
                self.written(self.notes)
        self.notes = []
        self.started = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.flush()  # finished rows are kept even on Ctrl-C
        elif self.part is not None:
            self.part.discard()
