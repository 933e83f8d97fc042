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
        pacsv.write_csv(result.select([c for c in result.column_names]).cast(_csv_safe(result.schema)), sink)
    elif fmt == "json":
        text = "\n".join(json.dumps(row, default=str) for row in result.to_pylist()) + "\n"
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


def _csv_safe(schema: pa.Schema) -> pa.Schema:
    """CSV has no lists or structs: those columns are written as their text form."""
    fields = []
    for f in schema:
        nested = pa.types.is_list(f.type) or pa.types.is_struct(f.type) or pa.types.is_large_list(f.type)
        fields.append(pa.field(f.name, pa.string()) if nested else f)
    return pa.schema(fields)
