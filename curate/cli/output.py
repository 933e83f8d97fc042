"""Output of `curate sql`: a table on the terminal, or csv/json/parquet to a file."""
from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL = 80


def write_result(result: pa.Table, fmt: str, output: str | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if not output:
            raise ValueError("--format parquet needs --output FILE")
        pq.write_table(result, output)
    elif fmt == "csv":
        sink = output or sys.stdout.buffer
        pacsv.write_csv(_csv_safe(result), sink)
    elif fmt == "json":
        text = "".join(json.dumps(row, default=_json_value) + "\n" for row in result.to_pylist())
        if output:
            open(output, "w").write(text)
        else:
            sys.stdout.write(text)
    else:
        table = Table(*result.column_names)
        for row in result.to_pylist():
            table.add_row(*(_cell(v) for v in row.values()))
        Console(file=open(output, "w") if output else sys.stdout, width=200).print(table)


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
    columns = []
    for f, column in zip(result.schema, result.columns):
        t = f.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_binary(t):
            column = pa.array([None if v is None else json.dumps(v, default=_json_value) for v in column.to_pylist()],
                              pa.string())
        columns.append(column)
    return pa.table(columns, names=result.column_names)
