"""The dataset store: a directory of tables of append-only Parquet parts, and SQL over them.

A part becomes visible atomically: it is written under a temporary name and renamed to
`part-*.parquet` only when complete, so a reader never sees half a part, and a process
killed anywhere leaves at most a temporary file that the next writer removes. `PartWriter`
buffers a run's rows into parts of a bounded size and age, so a kill loses little work.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

from curate.schema import MANIFEST_COLUMNS, TABLES, arrow_schemas, duckdb_type

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

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


class Rows(NamedTuple):
    """A query's result as Python values, made without pyarrow (`curate sql` and `info` start
    faster without it): the column names and one tuple per row."""

    columns: list[str]
    rows: list[tuple]

    def to_pylist(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


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
        if create:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
        elif not self.tables_dir.is_dir():
            raise DatasetError(f"{self.root} is not a curate dataset (no tables/ folder); "
                               f"run `curate ingest SRC {root}` first")

    # ---- parts -------------------------------------------------------------------
    def table_dir(self, name: str) -> Path:
        return self.tables_dir / name

    def parts(self, name: str) -> list[Path]:
        """Complete parts of a table in write order; temporary and damaged parts are skipped.

        A part is only ever renamed into place whole, so a part that ends in a Parquet footer
        is complete: reading its last 8 bytes is enough, where parsing every footer would
        cost seconds for the tens of thousands of parts of a 1.5M-image dataset."""
        folder = self.table_dir(name)
        try:
            names = sorted(entry.name for entry in os.scandir(folder) if fnmatch(entry.name, PART_GLOB))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [folder / n for n in names if _ends_in_footer(folder / n)]

    def write_part(self, name: str, table: pa.Table | dict) -> Path | None:
        """Write rows as one new part, atomically. Returns the part's path (None if no rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = schema_of(name)
        if isinstance(table, dict):
            table = pa.Table.from_pydict(table, schema=schema)
        else:
            table = table.select(schema.names).cast(schema)
        if table.num_rows == 0:
            return None
        folder = self.table_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        self.remove_stale_tmp(name)
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.parquet"
        final = folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        raw = RAW_COLUMNS.get(name, set())
        cooked = [c for c in table.column_names if c not in raw | BLOB_COLUMNS.get(name, set())]
        rows_per_group = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes)))
        pq.write_table(table, tmp, row_group_size=rows_per_group, use_dictionary=cooked, write_statistics=cooked,
                       compression={c: "none" if c in raw else "zstd" for c in table.column_names})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def remove_stale_tmp(self, name: str) -> None:
        """Remove temporary parts left by processes that no longer run."""
        remove_stale_temporaries(self.table_dir(name))

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
        image bytes (the ids are hashes: row-group statistics never rule a group out)."""
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        parts = self.parts(name)
        if not parts:
            return
        # Parts are local files: Arrow's pre-buffering (made for object stores) reads whole row
        # groups into fresh memory first, which for image bytes cost 2-10x the read itself.
        parquet = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            pre_buffer=False))
        data = pads.dataset([str(p) for p in parts], schema=schema_of(name), format=parquet)
        if ids is not None:
            groups = [group for part in data.get_fragments() for group in part.split_by_row_group()
                      if not ids.isdisjoint(group.to_table(columns=["image_id"]).column("image_id").to_pylist())]
            data = pads.FileSystemDataset(groups, schema_of(name), parquet, pafs.LocalFileSystem())
        yield from data.to_batches(columns=columns, filter=filter, batch_size=batch_size, use_threads=use_threads)

    def _schema(self, name: str, columns: list[str] | None) -> pa.Schema:
        import pyarrow as pa

        schema = schema_of(name)
        return schema if columns is None else pa.schema([schema.field(c) for c in columns])

    # ---- SQL ---------------------------------------------------------------------
    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a view per table and the `manifest` view."""
        import duckdb

        con = duckdb.connect()
        for sql in self.view_sql():
            con.execute(sql)
        return con

    def view_sql(self) -> list[str]:
        return [self.table_view_sql(name) for name in TABLES] + manifest_view_sql()

    def table_view_sql(self, name: str) -> str:
        """A view of a table's parts as they are now (a typed empty view when it has none)."""
        parts = self.parts(name)
        if parts:
            files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
            return f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet([{files}], union_by_name=true)'
        cols = ", ".join(f'CAST(NULL AS {duckdb_type(c.type)}) AS "{c.name}"' for c in TABLES[name])
        return f'CREATE OR REPLACE VIEW "{name}" AS SELECT {cols} WHERE false'

    def refresh_manifest_db(self) -> Path:
        """Write manifest.duckdb: the same views, for DuckDB clients outside curate.

        Written aside and renamed, so a client that has the old file open keeps reading
        it and two refreshes never fight over DuckDB's file lock.
        """
        path = self.root / "manifest.duckdb"
        remove_stale_temporaries(self.root)  # left by a killed refresh
        tmp = self.root / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.duckdb"
        import duckdb

        con = duckdb.connect(str(tmp))
        try:
            for sql in self.view_sql():
                con.execute(sql)
        finally:
            con.close()
        os.replace(tmp, path)
        return path

    def sql(self, sql: str, rows: bool = False) -> pa.Table | Rows:
        """Run one read-only query (SELECT or EXPLAIN) on a freshly refreshed manifest.duckdb;
        the result as an Arrow table, or with `rows` as Python values."""
        import duckdb

        path = self.refresh_manifest_db()
        con = duckdb.connect(str(path), read_only=True)
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

    def query(self, sql: str, rows: bool = False) -> pa.Table | Rows:
        import duckdb

        con = self.connect()
        try:
            return _result(con.sql(sql), rows)
        except duckdb.Error as e:
            raise DatasetError(f"query failed: {e}") from None
        finally:
            con.close()

    def select_ids(self, where: str | None = None) -> list[str]:
        """Ids of ok images, optionally filtered by a SQL predicate over `manifest`."""
        return self.select(where).column("image_id").to_pylist()

    def select(self, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Manifest rows of ok images (`columns`, default the image_id; `["*"]` all), optionally
        filtered by a SQL predicate over `manifest`, in image_id order."""
        sql = f"SELECT {', '.join(columns or ['image_id'])} FROM manifest"
        if where:
            sql += f" WHERE ({where})"
        try:
            return self.query(sql + " ORDER BY image_id")
        except DatasetError as e:
            raise DatasetError(f"bad --where {where!r}: {e}. Columns: {', '.join(self.manifest_columns())}") from None

    def manifest_columns(self) -> list[str]:
        con = self.connect()
        try:
            return [row[0] for row in con.execute("DESCRIBE manifest").fetchall()]
        finally:
            con.close()


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files (`.tmp-<pid>-*`) in `folder` of processes that no longer run."""
    for tmp in folder.glob(TMP_PREFIX + "*"):
        match = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)


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


def stage_manifest_sql() -> str:
    """One row per ok image, joined with the latest ok row of every stage table (no edits)."""
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
        "WITH img AS ("
        "SELECT image_id, min(source) AS source, list(source ORDER BY source) AS sources, "
        "any_value(width) AS width, any_value(height) AS height, any_value(format) AS format, "
        "any_value(mode) AS mode, any_value(animated) AS animated, max(size_bytes) AS size_bytes "
        "FROM images WHERE status = 'ok' GROUP BY image_id) "
        f"SELECT {', '.join(selects)} FROM img {' '.join(joins)}"
    )


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


class PartWriter:
    """Buffers rows of one table and writes a part every PART_ROWS rows, PART_BYTES bytes or
    PART_SECONDS seconds; what is buffered is written on exit, also on Ctrl-C."""

    def __init__(self, ds: Dataset, table: str):
        self.ds, self.table = ds, table
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
            import pyarrow as pa

            rows = pa.concat_tables(self.buffer)
            for start in range(0, rows.num_rows, PART_ROWS):  # a model batch can be larger than a part
                self.ds.write_part(self.table, rows.slice(start, PART_ROWS))
        self.buffer, self.rows, self.bytes = [], 0, 0
        self.last_flush = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.flush()  # finished rows are kept even on Ctrl-C
