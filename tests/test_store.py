import os
from pathlib import Path

import pyarrow as pa
import pytest

from curate.store import Dataset, DatasetError, now


def test_ingest_counts_duplicates_and_errors(dataset):
    images = dataset.read("images")
    assert images.num_rows == 14
    status = dict(zip(images.column("source").to_pylist(), images.column("error").to_pylist()))
    assert [e for e in status.values() if e] == ["unidentified"]
    ok = dataset.query("SELECT count(*) AS n, count(DISTINCT image_id) AS ids FROM images "
                       "WHERE status='ok'").to_pylist()[0]
    assert ok == {"n": 13, "ids": 12}
    # the duplicate keeps its source but not a second copy of the bytes
    stored = dataset.query("SELECT count(*) AS n FROM images WHERE bytes IS NOT NULL").to_pylist()[0]["n"]
    assert stored == 12
    manifest = dataset.query("SELECT len(sources) AS n FROM manifest ORDER BY n DESC LIMIT 1").to_pylist()
    assert manifest[0]["n"] == 2


def test_reingest_adds_nothing(dataset, image_dir):
    from curate.pipelines.ingest import ingest

    before = len(dataset.parts("images"))
    counts = ingest([str(image_dir)], dataset, show_progress=False)
    assert len(dataset.parts("images")) == before
    assert counts.done == 0 and not counts.counts


def test_readers_skip_temporary_and_damaged_parts(dataset):
    folder = dataset.table_dir("images")
    (folder / ".tmp-1-abc.parquet").write_bytes(b"half a part")
    (folder / "part-99999999999999999999-dead.parquet").write_bytes(b"PAR1 damaged")
    assert dataset.read("images").num_rows == 14
    assert dataset.query("SELECT count(*) AS n FROM images").to_pylist()[0]["n"] == 14


def test_where_selects_from_manifest(dataset):
    wide = dataset.select_ids("width > height")
    assert 0 < len(wide) < len(dataset.select_ids())
    with pytest.raises(DatasetError, match="bad --where"):
        dataset.select_ids("no_such_column > 1")


def test_empty_tables_have_typed_views(dataset):
    row = dataset.query("SELECT rank, has_watermark, tags FROM manifest LIMIT 1").to_pylist()[0]
    assert row == {"rank": None, "has_watermark": None, "tags": None}


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a curate dataset"):
        Dataset(tmp_path / "nothing")


def test_plan_reads_only_the_row_groups_holding_the_ids(tmp_path):
    """A resumed pass asks for the images left; the row groups it finished are not read."""
    from curate.pipelines.stage import Stage
    from curate.pipelines.work import Work

    class OverStats(Stage):  # a stage whose input is the stats table
        source, table, columns = "stats", "buckets", ("image_id",)

        def model_key(self):
            return "over-stats"

    ds = Dataset(tmp_path / "ds", create=True)
    parts = [[f"{k}{i:03d}" for i in range(5)] for k in "abc"]
    for ids in parts:  # a part is one row group here
        rows = [{"image_id": i, "model": "m", "status": "ok", "created_at": now()} for i in ids]
        ds.write_part("stats", pa.Table.from_pylist(rows, schema=ds.read("stats").schema))
    work = Work(ds, [OverStats()], owner="me")
    names = [p.stem for p in ds.parts("stats")]
    units = list(work.plan([{"b002", "zzz"}]))
    assert [(u.name, u.row_groups, u.keys) for u in units] == [(names[1], [0], [{"b002"}])]  # nothing of a or c
    read = [b.column("image_id").to_pylist() for b in work.read(units[0], units[0].keys, 64)]
    assert read == [["b002"]]
    assert list(work.plan([{"zzz"}])) == []
    assert [u.name for u in work.plan([{"a000", "c004"}])] == [names[0], names[2]]


def documented_columns(readme: str) -> dict[str, set[str]]:
    """The first cells of each `## section`'s tables in data/README.md, keyed by the
    section's first word (`## images (...)` -> images)."""
    columns: dict[str, set[str]] = {}
    section = None
    for line in readme.splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0]
        elif section and line.startswith("| ") and not line.startswith(("| column", "| code", "| ---")):
            columns.setdefault(section, set()).update(c.strip() for c in line.split("|")[1].split(","))
    return columns


def test_data_readme_documents_every_column_and_error_code():
    from curate.schema import ERROR_CODES, SCHEMAS, STAGE_COLUMNS

    documented = documented_columns((Path(__file__).parents[1] / "data" / "README.md").read_text())
    common = {f.name for f in STAGE_COLUMNS}
    assert documented["Columns"] == common
    assert documented["Error"] == set(ERROR_CODES)
    for table, schema in SCHEMAS.items():
        own = set(schema.names) - (common if common <= set(schema.names) else set())
        assert own <= documented.get(table, set()), f"{table}: {own - documented.get(table, set())} undocumented"


def test_parts_of_another_schema_are_never_read_and_are_reported(dataset, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from conftest import run_cli

    from curate.pipelines.executor import run
    from curate.pipelines.stats import StatsStage

    run(dataset, StatsStage(), show_progress=False)
    manifest_before = dataset.query("SELECT image_id, phash, tags FROM manifest ORDER BY image_id").to_pylist()
    tags_dir = dataset.table_dir("tags")
    tags_dir.mkdir()
    # another table's part dropped into tags/, and a tags part whose `tags` column is a string
    pq.write_table(dataset.read("stats"), tags_dir / "part-00000000000000000001-stats.parquet")
    wrong = pa.table({"image_id": dataset.select_ids()[:3], "model": ["m"] * 3, "status": ["ok"] * 3,
                      "tags": ["a, b"] * 3, "created_at": pa.array([now()] * 3, pa.timestamp("us", tz="UTC"))})
    pq.write_table(wrong, tags_dir / "part-00000000000000000002-wrong.parquet")
    assert dataset.read("tags").num_rows == 0
    assert dataset.query("SELECT image_id, phash, tags FROM manifest ORDER BY image_id").to_pylist() == manifest_before
    unread = {path.name: why for table, path, why in dataset.unread_parts() if table == "tags"}
    assert "not in this table's schema" in unread["part-00000000000000000001-stats.parquet"]
    assert "'tags' is string" in unread["part-00000000000000000002-wrong.parquet"]

    monkeypatch.setenv("COLUMNS", "250")  # the report's lines unwrapped
    proc = run_cli("info", str(dataset.root))
    assert "part-00000000000000000001-stats.parquet" in proc.stdout and "part-00000000000000000002" in proc.stdout
    proc = run_cli("sql", str(dataset.root), "SELECT count(*) AS n FROM tags", "--format", "csv")
    assert proc.stdout.split() == ['"n"', "0"]
    assert "warning:" in proc.stderr and "part-00000000000000000001-stats.parquet is not read" in proc.stderr


def test_select_ids_joins_only_the_tables_a_predicate_names(dataset):
    from curate.pipelines.executor import run
    from curate.pipelines.stats import StatsStage
    from curate.store import tables_for

    assert tables_for("") == set() and tables_for("width > 300") == set()
    assert tables_for("rank >= 5 AND NOT has_watermark") == {"quality", "watermarks"}
    assert tables_for("list_contains(tags, 'sky')") == {"tags", "watermarks"}  # the manifest's tags read both
    run(dataset, StatsStage(), show_progress=False)
    full = "SELECT image_id FROM manifest WHERE {} ORDER BY image_id"
    for where in ("sharpness > 0 AND width > height", "phash IS NOT NULL", "caption IS NULL", "true"):
        assert dataset.select_ids(where) == dataset.query(full.format(where)).column("image_id").to_pylist()


def test_parts_are_listed_again_only_when_the_folder_changes(dataset, monkeypatch):
    import curate.store as store

    checked = []
    real = store._ends_in_footer
    monkeypatch.setattr(store, "_ends_in_footer", lambda path: checked.append(path) or real(path))
    folder = dataset.table_dir("images")
    os.utime(folder, ns=(0, 0))  # as if it last changed long ago: a listing may be kept
    first = dataset.parts("images")
    assert dataset.parts("images") == first and len(checked) == len(first)  # listed once, then kept
    (folder / "part-99999999999999999999-late.parquet").write_bytes(b"")  # any change: listed again
    assert dataset.parts("images") == first and len(checked) == 2 * len(first) + 1
    added = dataset.write_part("images", dataset.read("images").slice(0, 1))  # the folder changes: a new listing
    assert dataset.parts("images") == first + [added]
