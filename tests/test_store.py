import pyarrow as pa
import pytest

from curate.manifest import Dataset, DatasetError


def test_ingest_counts_duplicates_and_errors(dataset):
    images = dataset.read("images")
    assert images.num_rows == 14
    status = dict(zip(images.column("source").to_pylist(), images.column("error").to_pylist()))
    assert [e for e in status.values() if e] == ["unidentified"]
    ok = dataset.query("SELECT count(*) AS n, count(DISTINCT image_id) AS ids FROM images WHERE status='ok'").to_pylist()[0]
    assert ok == {"n": 13, "ids": 12}
    # the duplicate keeps its source but not a second copy of the bytes
    stored = dataset.query("SELECT count(*) AS n FROM images WHERE bytes IS NOT NULL").to_pylist()[0]["n"]
    assert stored == 12
    manifest = dataset.query("SELECT len(sources) AS n FROM manifest ORDER BY n DESC LIMIT 1").to_pylist()
    assert manifest[0]["n"] == 2


def test_reingest_adds_nothing(dataset, image_dir):
    from pipelines.ingest import ingest

    before = len(dataset.parts("images"))
    counts = ingest([str(image_dir)], dataset, show_progress=False)
    assert len(dataset.parts("images")) == before
    assert set(counts) == {"seconds"}


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
