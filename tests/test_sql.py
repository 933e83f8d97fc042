"""`curate sql`: every output format, a read-only connection, clear errors."""
import json

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from curate.cli.output import write_result
from curate.store import DatasetError

QUERY = "SELECT source, width, height, sources FROM manifest ORDER BY source"


def test_formats(dataset, tmp_path):
    ds = str(dataset.root)
    table = run_cli("sql", ds, QUERY).stdout
    assert "img00.png" in table and "width" in table
    rows = [json.loads(line) for line in run_cli("sql", ds, QUERY, "--format", "json").stdout.splitlines()]
    assert len(rows) == 12 and rows[0]["source"].endswith("copy_of_img01.jpg") and isinstance(rows[0]["sources"], list)

    run_cli("sql", ds, QUERY, "--format", "csv", "--output", str(tmp_path / "out.csv"))
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == '"source","width","height","sources"' and len(lines) == 13
    run_cli("sql", ds, QUERY, "--format", "parquet", "-o", str(tmp_path / "out.parquet"))
    back = pq.read_table(tmp_path / "out.parquet")
    assert back.num_rows == 12 and back.column("source").to_pylist() == [r["source"] for r in rows]
    write_result(dataset.sql(QUERY), "json", str(tmp_path / "out.json"))
    assert [json.loads(x) for x in (tmp_path / "out.json").read_text().splitlines()] == rows
    # bytes are summarised in text formats, not dumped
    one = dataset.sql("SELECT bytes FROM images WHERE bytes IS NOT NULL LIMIT 1")
    write_result(one, "json", str(tmp_path / "bytes.json"))
    assert json.loads((tmp_path / "bytes.json").read_text())["bytes"].endswith(" bytes>")


def test_refresh_leaves_no_temporary_files(dataset):
    (dataset.root / ".tmp-999999999-dead.duckdb").write_bytes(b"left by a killed refresh")
    dataset.sql("SELECT 1")
    dataset.sql("SELECT 2")
    assert sorted(p.name for p in dataset.root.iterdir()) == ["manifest.duckdb", "tables"]


def test_read_only(dataset, tmp_path):
    for statement in ["DROP VIEW images", "CREATE TABLE x AS SELECT 1", f"COPY images TO '{tmp_path}/leak.csv'",
                      "INSTALL httpfs", "SET threads = 1", "SELECT 1; DROP VIEW manifest"]:
        with pytest.raises(DatasetError, match="read-only|exactly one query"):
            dataset.sql(statement)
    assert not (tmp_path / "leak.csv").exists()
    proc = run_cli("sql", str(dataset.root), "DELETE FROM images", check=False)
    assert proc.returncode == 2 and "curate sql is read-only: a DELETE statement is refused" in proc.stderr
    assert dataset.sql("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 14}]


def test_bad_input_is_a_clear_error(dataset, tmp_path):
    ds = str(dataset.root)
    proc = run_cli("sql", ds, "SELEC * FROM images", check=False)
    assert proc.returncode == 2 and "query failed" in proc.stderr and "syntax error" in proc.stderr
    proc = run_cli("sql", ds, QUERY, "--format", "xml", check=False)
    assert proc.returncode == 2 and "table, csv, json, parquet" in proc.stderr
    with pytest.raises(DatasetError, match="nope"):
        dataset.sql("SELECT nope FROM manifest")
    with pytest.raises(ValueError, match="--output"):
        write_result(dataset.sql(QUERY), "parquet", None)
