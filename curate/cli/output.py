"""Output of `curate sql`, `info` and `dups`: a table on the terminal, or csv/json/parquet to a
file. A result is an Arrow table, or `Rows` of Python values: the table and json formats take
those as they are, so a query printed on the terminal never needs pyarrow."""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from curate.store import Rows

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL = 80


def write_result(result: pa.Table | Rows, fmt: str, output: str | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if not output:
            raise ValueError("--format parquet needs --output FILE")
        pq.write_table(_arrow(result), output)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        sink = output or sys.stdout.buffer
        pacsv.write_csv(_csv_safe(_arrow(result)), sink)
    elif fmt == "json":
        text = "".join(json.dumps(row, default=_json_value) + "\n" for row in result.to_pylist())
        if output:
            open(output, "w").write(text)
        else:
            sys.stdout.write(text)
    else:
        from rich.console import Console
        from rich.table import Table

        rows = result if isinstance(result, Rows) else Rows(result.column_names, [
            tuple(row.values()) for row in result.to_pylist()])
        table = Table(*rows.columns)
        for row in rows.rows:
            table.add_row(*(_cell(v) for v in row))
        Console(file=open(output, "w") if output else sys.stdout, width=200).print(table)


def _arrow(result: pa.Table | Rows) -> pa.Table:
    import pyarrow as pa

    if not isinstance(result, Rows):
        return result
    return pa.table({name: [row[k] for row in result.rows] for k, name in enumerate(result.columns)})


def _cell(value) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _json_value(value) -> str:
    if isinstance(value, bytes):  # image bytes belong in parquet output, not in text
        return f"<{len(value)} bytes>"
    return str(value)


def _csv_safe(result: pa.Table) -> pa.Table:
    """CSV has no lists, structs or bytes: those columns are written as JSON text."""
    import pyarrow as pa

    columns = []
    for f, column in zip(result.schema, result.columns):
        t = f.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_binary(t):
            column = pa.array([None if v is None else json.dumps(v, default=_json_value) for v in column.to_pylist()],
                              pa.string())
        columns.append(column)
    return pa.table(columns, names=result.column_names)
