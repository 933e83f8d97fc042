"""The dataset store: a directory of tables of append-only Parquet parts, and SQL over them.

A part becomes visible atomically: it is written under a temporary name and renamed to
`part-*.parquet` only when complete, so a reader never sees half a part, and a process
killed anywhere leaves at most a temporary file that the next writer removes. `PartWriter`
buffers a run's rows into parts of a bounded size and age, so a kill loses little work.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from curate.claims import ClaimError, Claims, Owner
from curate.progress import warn
from curate.schema import MANIFEST_COLUMNS, SCHEMAS

PART_GLOB = "part-*.parquet"
TMP_PREFIX = ".tmp-"
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 32 << 20  # fewer rows per group when rows are big (image bytes, SDXL latents): readers stream groups
READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# Rows per part: bounds the work lost to a kill (CURATE_PART_ROWS overrides it, e.g. in tests).
PART_ROWS = int(os.environ.get("CURATE_PART_ROWS", "2048"))
PART_SECONDS = 60.0  # and so does time, for slow stages
PART_BYTES = 256 << 20
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
    try:
        duckdb.SQLExpression(where)
    except duckdb.Error as e:
        raise DatasetError(f"bad --where {where!r}: give one SQL expression over the manifest's columns, such as "
                           f"\"rank >= 5 AND NOT has_watermark\" ({str(e).splitlines()[0]})") from None
    # Its own lines: a trailing -- comment ends at the newline, before the closing parenthesis.
    return f"(\n{where}\n)"


# Parts are local files: Arrow's pre-buffering (made for object stores) reads whole row
# groups into fresh memory first, which for image bytes cost 2-10x the read itself.
PARQUET = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False))


def now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Dataset:
    def __init__(self, root: str | os.PathLike, create: bool = False):
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

    # ---- parts -------------------------------------------------------------------
    def table_dir(self, name: str) -> Path:
        return self.tables_dir / name

    def parts(self, name: str) -> list[Path]:
        """The table's parts in write order. Temporary parts are not parts yet; a damaged part,
        or one whose schema is not the table's (another table's part, a column of another type),
        is never read as rows: it is skipped with a warning naming it (`unread_parts` lists them)."""
        good = []
        for path in self._part_files(name):
            problem = checked_part(path, name)
            if problem is None:
                good.append(path)
            elif path not in _WARNED:
                _WARNED.add(path)
                warn(f"{path} is not read: {problem}")
        return good

    def unread_parts(self) -> list[tuple[str, Path, str]]:
        """(table, part, why) for every part a reader skips: damaged, or not the table's schema."""
        return [(name, path, problem) for name in SCHEMAS for path in self._part_files(name)
                if (problem := checked_part(path, name)) is not None]

    def _part_files(self, name: str) -> list[Path]:
        folder = self.table_dir(name)
        return sorted(folder.glob(PART_GLOB)) if folder.is_dir() else []

    def write_part(self, name: str, table: pa.Table | dict) -> Path | None:
        """Write rows as one new part, atomically. Returns the part's path (None if no rows)."""
        schema = SCHEMAS[name]
        if isinstance(table, dict):
            table = pa.Table.from_pydict(table, schema=schema)
        else:
            table = table.select(schema.names).cast(schema)
        if table.num_rows == 0:
            return None
        folder = self.table_dir(name)
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.parquet"
        final = folder / f"part-{self._next_stamp(name):020d}-{uuid.uuid4().hex[:8]}.parquet"
        raw = RAW_COLUMNS.get(name, set())
        cooked = [c for c in table.column_names if c not in raw | BLOB_COLUMNS.get(name, set())]
        rows_per_group = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes)))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.remove_stale_tmp(name)
            pq.write_table(table, tmp, row_group_size=rows_per_group, use_dictionary=cooked,
                           write_statistics=cooked,
                           compression={c: "none" if c in raw else "zstd" for c in table.column_names})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:  # a full disk, a read-only dataset: no partial part stays behind
            tmp.unlink(missing_ok=True)
            raise write_error(e, f"a part of {name}", folder) from None
        return final

    def _next_stamp(self, name: str) -> int:
        """A new part's time stamp: now, but after every part already there, so parts sort in
        the order they were written even when writers' clocks differ (machines sharing the
        dataset): a row that refers to an earlier one (an exact duplicate whose bytes are
        stored elsewhere) always comes after it."""
        stamps = [int(p.name.split("-")[1]) for p in self._part_files(name) if p.name.split("-")[1].isdigit()]
        return max([time.time_ns(), *(s + 1 for s in stamps)])

    def remove_stale_tmp(self, name: str) -> None:
        """Remove temporary parts left by processes that no longer run."""
        _remove_stale_tmp(self.table_dir(name))

    # ---- claims on work (curate/claims.py) --------------------------------------------
    @contextmanager
    def owner(self) -> Iterator[Owner]:
        """This run, for claiming work: its record lives while the block runs."""
        owner = Owner(self.root)
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
        return Claims(str(self.root), table, model, owner if isinstance(owner, str) else owner.id)

    # ---- reading -----------------------------------------------------------------
    def read(self, name: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        return pa.Table.from_batches(list(self.scan(name, columns, filter)), schema=self._schema(name, columns))

    def scan(self, name: str, columns: list[str] | dict | None = None, filter=None, batch_size: int = 256,
             use_threads: bool = True) -> Iterator[pa.RecordBatch]:
        """Stream a table's rows in batches, reading only the columns asked for (or a
        projection: name -> expression), on Arrow's threads unless use_threads is False."""
        parts = self.parts(name)
        if not parts:
            return
        data = pads.dataset([str(p) for p in parts], schema=SCHEMAS[name], format=PARQUET)
        yield from data.to_batches(columns=columns, filter=filter, batch_size=batch_size, use_threads=use_threads)

    def scan_part(self, name: str, part: Path | str, columns: list[str] | dict, row_groups: list[int] | None = None,
                  batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream one part's rows (only `row_groups` when given) on this thread, as `scan` does."""
        (fragment,) = pads.dataset([str(part)], schema=SCHEMAS[name], format=PARQUET).get_fragments()
        if row_groups is not None:
            fragment = fragment.subset(row_group_ids=row_groups)
        scanner = pads.Scanner.from_fragment(fragment, schema=SCHEMAS[name], columns=columns, batch_size=batch_size,
                                             use_threads=False)
        yield from scanner.to_batches()

    @staticmethod
    def row_group_sizes(part: Path | str) -> list[int]:
        metadata = pq.read_metadata(part)
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]

    def _schema(self, name: str, columns: list[str] | None) -> pa.Schema:
        schema = SCHEMAS[name]
        return schema if columns is None else pa.schema([schema.field(c) for c in columns])

    # ---- SQL ---------------------------------------------------------------------
    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a view per table and the `manifest` view, that
        reads the dataset's parts and nothing else: no other file (read_text, read_csv, glob),
        no writes (COPY), no ATTACH, no extensions installed or loaded, and its settings locked.
        A user's `--where` and `curate sql` run on it."""
        parts = {name: self.parts(name) for name in SCHEMAS}
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        try:
            allowed = ", ".join(_quote(str(p)) for table in parts.values() for p in table)
            con.execute(f"SET allowed_paths = [{allowed}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            for sql in self.view_sql(parts):
                con.execute(sql)
        except BaseException:
            con.close()
            raise
        return con

    def view_sql(self, parts: dict[str, list[Path]] | None = None) -> list[str]:
        statements = []
        for name, schema in SCHEMAS.items():
            parts_of = parts[name] if parts is not None else self.parts(name)
            if parts_of:
                files = ", ".join(_quote(str(p)) for p in parts_of)
                statements.append(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * '
                                  f'FROM read_parquet([{files}], union_by_name=true)')
            else:
                cols = ", ".join(f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in schema)
                statements.append(f'CREATE OR REPLACE VIEW "{name}" AS SELECT {cols} WHERE false')
        statements.append(manifest_view_sql())
        return statements

    def refresh_manifest_db(self) -> Path:
        """Write manifest.duckdb: the same views, for DuckDB clients outside curate.

        Written aside, checked and renamed, so a client that has the old file open keeps
        reading it, two refreshes never fight over DuckDB's file lock, and a refresh that
        fails (a full disk, a read-only dataset) keeps the previous file.
        """
        path = self.root / "manifest.duckdb"
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.duckdb"
        try:
            _remove_stale_tmp(self.root)  # left by a killed refresh
            con = duckdb.connect(str(tmp))
            try:
                for sql in self.view_sql():
                    con.execute(sql)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            check = duckdb.connect(str(tmp), read_only=True)  # DuckDB may not say that its writes failed
            try:
                check.execute("SELECT * FROM manifest LIMIT 0")
            finally:
                check.close()
            os.replace(tmp, path)
        except (OSError, duckdb.Error) as e:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass
            error = write_error(e, "manifest.duckdb", self.root) if isinstance(e, OSError) else e
            raise DatasetError(f"{error}; the previous manifest.duckdb is kept") from None
        return path

    def sql(self, sql: str) -> pa.Table:
        """Run one read-only query (SELECT or EXPLAIN) over the tables and `manifest`, on a
        connection that reads nothing but the dataset. manifest.duckdb is refreshed first
        for other DuckDB clients; where that fails (a full disk, a read-only dataset) the query
        still runs, with a warning."""
        try:
            self.refresh_manifest_db()
        except DatasetError as e:
            warn(f"manifest.duckdb was not refreshed: {e}")
        con = self.connect()
        try:
            statements = con.extract_statements(sql)
            if len(statements) != 1:
                raise DatasetError(f"give exactly one query; got {len(statements)} statements")
            kind = statements[0].type.name
            # The connection is read-only, but DuckDB would still run COPY ... TO a file,
            # INSTALL, ATTACH or SET: only queries get through.
            if kind not in READ_ONLY_STATEMENTS:
                raise DatasetError(f"curate sql is read-only: a {kind} statement is refused; give a SELECT query")
            return con.sql(sql).to_arrow_table()
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def query(self, sql: str) -> pa.Table:
        con = self.connect()
        try:
            return con.sql(sql).to_arrow_table()
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def select_ids(self, where: str | None = None) -> list[str]:
        """Ids of ok images, optionally filtered by a SQL expression over `manifest`."""
        sql = "SELECT image_id FROM manifest"
        if where:
            sql += f" WHERE {where_clause(where)}"
        try:
            return self.query(sql + " ORDER BY image_id").column("image_id").to_pylist()
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


def checked_part(path: Path, table: str) -> str | None:
    """part_problem, asked once per part and process (a pass lists a table's parts often)."""
    if path not in _CHECKED:
        _CHECKED[path] = part_problem(path, SCHEMAS[table])
    return _CHECKED[path]


def part_problem(path: Path, schema: pa.Schema) -> str | None:
    """Why a part is not one of its table's (None: it is): unreadable, a column the table
    does not have or of another type, or a required column missing. Columns added to a table
    later may be missing from older parts (they read as null)."""
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


def _remove_stale_tmp(folder: Path) -> None:
    for tmp in folder.glob(TMP_PREFIX + "*"):
        match = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _duck_type(t.value_type) + "[]"
    if pa.types.is_struct(t):
        return "STRUCT(" + ", ".join(f'"{f.name}" {_duck_type(f.type)}' for f in t) + ")"
    simple = {
        pa.string(): "VARCHAR", pa.binary(): "BLOB", pa.bool_(): "BOOLEAN",
        pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
        pa.uint64(): "UBIGINT", pa.float16(): "FLOAT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE",
    }
    if t in simple:
        return simple[t]
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    raise TypeError(f"no DuckDB type for {t}")


def manifest_view_sql() -> str:
    """One row per ok image, joined with the latest ok row of every stage table."""
    selects = ["img.*"]
    joins = []
    for table, exprs in MANIFEST_COLUMNS.items():
        selects += exprs
        joins.append(
            f'LEFT JOIN (SELECT * FROM "{table}" WHERE status = \'ok\' '
            f"QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY created_at DESC) = 1) AS {table} "
            f"ON {table}.image_id = img.image_id"
        )
    return (
        "CREATE OR REPLACE VIEW manifest AS WITH img AS ("
        "SELECT image_id, min(source) AS source, list(source ORDER BY source) AS sources, "
        "any_value(width) AS width, any_value(height) AS height, any_value(format) AS format, "
        "any_value(mode) AS mode, any_value(animated) AS animated, max(size_bytes) AS size_bytes "
        "FROM images WHERE status = 'ok' GROUP BY image_id) "
        f"SELECT {', '.join(selects)} FROM img {' '.join(joins)}"
    )


class PartWriter:
    """Buffers rows of one table and writes a part every PART_ROWS rows, PART_BYTES bytes or
    PART_SECONDS seconds; what is buffered is written on exit, also on Ctrl-C.

    `before` is called before each part is written (it may refuse by raising), `written`
    with the rows of each part once it is visible."""

    def __init__(self, ds: Dataset, table: str, before: Callable[[], None] | None = None,
                 written: Callable[[pa.Table], None] | None = None):
        self.ds, self.table, self.before, self.written = ds, table, before, written
        self.buffer: list[pa.Table] = []
        self.rows = 0
        self.bytes = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.rows += table.num_rows
        self.bytes += table.nbytes
        if self.rows >= PART_ROWS or self.bytes >= PART_BYTES or time.monotonic() - self.last_flush > PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rows = pa.concat_tables(self.buffer)
            for start in range(0, rows.num_rows, PART_ROWS):  # a model batch can be larger than a part
                if self.before:
                    self.before()
                self.ds.write_part(self.table, rows.slice(start, PART_ROWS))
                if self.written:
                    self.written(rows.slice(start, PART_ROWS))
        self.buffer, self.rows, self.bytes = [], 0, 0
        self.last_flush = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.flush()  # finished rows are kept even on Ctrl-C
