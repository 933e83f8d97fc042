"""`--where` is one expression over the manifest, never a statement, and SQL cannot reach
outside the dataset: no other file read, no file written, no ATTACH, no extension installed."""
from pathlib import Path

import pytest
from conftest import run_cli

from curate.store import DatasetError
from curate.trainer.config import TrainConfig
from curate.trainer.rows import load_rows


def injections(target: Path) -> list[str]:
    """Predicates that try to run a statement, or to read or write outside the dataset."""
    t = str(target)
    return [
        f"1=1); COPY (SELECT 'x') TO '{t}.csv'; SELECT (1=1",  # the issue's own
        f"1=1) OR (1=1); COPY (SELECT 1) TO '{t}.csv'; SELECT (1",
        f"true; ATTACH '{t}.db' AS x",
        "true; INSTALL httpfs",
        "true; LOAD httpfs",
        "true; SET enable_external_access = true",
        f"true /* */); COPY (SELECT 1) TO '{t}.csv'; SELECT (/* */ true",
        "true) UNION ALL (SELECT image_id FROM images",  # a second query glued on
        "true ORDER BY image_id",
        "true, false",
        # single expressions that try to read outside the dataset
        "image_id IN (SELECT content FROM read_text('/etc/passwd'))",
        "image_id IN (SELECT * FROM query('SELECT content FROM read_text(''/etc/passwd'')'))",
        f"image_id IN (SELECT * FROM query('COPY (SELECT 1) TO ''{t}.csv'''))",
        "image_id IN (SELECT column0 FROM read_csv('/etc/passwd'))",
        "image_id IN (SELECT file FROM glob('/etc/*'))",
        "image_id IN (SELECT image_id FROM read_parquet('https://example.com/x.parquet'))",
        f"image_id IN (SELECT image_id FROM read_parquet('{t}.parquet'))",
    ]


def test_where_refuses_statements_and_outside_access(dataset, tmp_path):
    target = tmp_path / "pwned"
    for where in injections(target):
        with pytest.raises(DatasetError, match="bad --where"):
            dataset.select_ids(where)
    # a comment is only a comment: what follows it never runs
    assert len(dataset.select_ids(f"true -- ); COPY (SELECT 1) TO '{target}.csv")) == 12
    assert not list(tmp_path.glob("pwned*"))
    # what a user means still works, subqueries over the dataset's own tables included
    assert len(dataset.select_ids("width > height -- the wide ones")) == 5
    assert len(dataset.select_ids("image_id IN (SELECT image_id FROM images WHERE source LIKE '%nested%')")) == 6


def test_cli_where_refused_with_exit_2_before_anything_runs(dataset, tmp_path):
    target = tmp_path / "pwned"
    for where in injections(target)[:3]:
        proc = run_cli("hash", str(dataset.root), "--where", where, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: bad --where") and "Traceback" not in proc.stderr
    proc = run_cli("hash", str(dataset.root), "--where", "no_such_column > 1", check=False)
    assert proc.returncode == 2 and "no_such_column" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("pwned*")) and not dataset.parts("stats")


def test_trainer_where_is_an_expression_too(dataset, tmp_path):
    for where in injections(tmp_path / "pwned")[:3]:
        with pytest.raises(ValueError, match="bad --where"):
            load_rows(dataset, TrainConfig(where=where))
    assert not list(tmp_path.glob("pwned*"))


def test_sql_cannot_read_or_write_outside_the_dataset(dataset, tmp_path):
    leak = tmp_path / "leak.csv"
    for query in [f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{leak}'",
                  "SELECT * FROM read_text('/etc/passwd')",
                  f"SELECT * FROM query('COPY (SELECT 1) TO ''{leak}''')",
                  "SELECT * FROM glob('/etc/*')",
                  f"EXPLAIN ANALYZE ATTACH '{tmp_path}/x.db'"]:
        with pytest.raises(DatasetError):
            dataset.sql(query)
    assert not leak.exists() and not (tmp_path / "x.db").exists()
    assert dataset.sql("SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 12}]


def test_view_and_report_filters_read_the_dataset_and_nothing_else(dataset, tmp_path):
    from curate.cli.report import write_report
    from curate.cli.view_data import ViewData

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    outside = [f"image_id IN (SELECT content FROM read_text('{secret}'))",
               f"image_id IN (SELECT column0 FROM read_csv('{secret}'))"]
    view = ViewData(dataset)
    for where in outside:
        with pytest.raises(ValueError, match="bad filter"):
            view.count(where)
        with pytest.raises(ValueError, match="bad --where"):
            write_report(dataset, tmp_path / "report.html", TrainConfig(where=where))
    assert view.count("width > height") == 5  # the page's own join (in DS/cache) still works
