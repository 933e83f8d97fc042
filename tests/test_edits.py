"""Hand edits: rows of their own table that the manifest, every --where and the trainer honour."""
from __future__ import annotations

import pytest

from curate import edits
from curate.trainer.config import load_config
from curate.trainer.rows import load_rows
from tests.trainer_helpers import image_id, make_latent_dataset


def row(ds, image: str, view: str = "manifest_all") -> dict:
    return ds.query(f"SELECT * FROM {view} WHERE image_id = '{image}'").to_pylist()[0]


def test_latest_edit_wins_and_undo_brings_back_the_one_before(tmp_path):
    ds = make_latent_dataset(tmp_path / "ds", 6)
    a, b = image_id(0), image_id(1)  # image 0 has a watermark box, image 1 none
    before = {i: row(ds, i) for i in (a, b)}
    assert "watermark" in before[a]["tags"] and before[a]["has_watermark"]

    added = edits.record(ds, "add_tag", [a, b], "  hand_tag ")
    no_mark = edits.record(ds, "remove_tag", [a], "watermark")
    first = edits.record(ds, "caption", [b], "A first caption.")
    edits.record(ds, "caption", [b], "A second caption.")
    gone = edits.record(ds, "exclude", [b])
    now_a, now_b = row(ds, a), row(ds, b)
    assert now_a["tags"] == [t for t in before[a]["tags"] if t != "watermark"] + ["hand_tag"]
    assert not now_a["has_watermark"] and now_a["watermark_boxes"] == []  # no prompt tag, no loss mask
    assert now_b["tags"] == before[b]["tags"] + ["hand_tag"] and now_b["caption"] == "A second caption."
    assert now_b["excluded"] and not now_a["excluded"]
    assert b not in ds.select_ids() and b not in ds.select_ids("list_contains(tags, 'hand_tag')")
    assert ds.select_ids("list_contains(tags, 'hand_tag')") == [a]
    assert ds.query("SELECT count(*) AS n FROM manifest").column("n")[0].as_py() == 5
    assert "excluded" not in ds.manifest_columns()

    edits.undo(ds, first)  # an older caption undone: the newer one still wins
    assert row(ds, b)["caption"] == "A second caption."
    for edit in (gone, no_mark, added):
        edits.undo(ds, edit)
    assert row(ds, a) == {**before[a], "excluded": False}
    after_b = row(ds, b)
    assert after_b["caption"] == "A second caption." and after_b["tags"] == before[b]["tags"]
    assert b in ds.select_ids()
    history = edits.history(ds)
    assert [h["action"] for h in history] == ["exclude", "caption", "caption", "remove_tag", "add_tag"]
    assert [h["undone"] for h in history] == [True, False, True, True, True] and history[-1]["images"] == 2
    assert ds.read("edits").num_rows == 2 + 1 + 1 + 1 + 1 + 4  # nothing deleted: undo is a row


def test_the_trainer_reads_the_edited_manifest(tmp_path):
    ds = make_latent_dataset(tmp_path / "ds", 6)
    a, b = image_id(0), image_id(1)
    edits.record(ds, "exclude", [b])
    edits.record(ds, "caption", [a], "Edited by hand.")
    edits.record(ds, "add_tag", [a], "by_hand")
    rows = {r.image_id: r for r in load_rows(ds, load_config(None))}
    assert b not in rows and len(rows) == 5
    assert rows[a].caption == "Edited by hand." and rows[a].tags[-1] == "by_hand"


def test_bad_edits_are_refused_before_anything_is_written(tmp_path):
    ds = make_latent_dataset(tmp_path / "ds", 2)
    for action, value in [("rename", "x"), ("add_tag", ""), ("add_tag", "a, b"), ("add_tag", None),
                          ("caption", "x" * 20_001), ("remove_tag", "two\nlines")]:
        with pytest.raises(ValueError):
            edits.record(ds, action, [image_id(0)], value)
    with pytest.raises(ValueError):
        edits.record(ds, "exclude", [])
    assert ds.read("edits").num_rows == 0


def test_the_view_joins_the_stage_tables_once_per_set_of_parts(tmp_path):
    from curate.cli.view_data import ViewData
    from curate.store import now

    ds = make_latent_dataset(tmp_path / "ds", 4)
    a = image_id(0)
    first = ViewData(ds)
    (cached,) = (ds.root / "cache").glob("manifest-*.parquet")
    edits.record(ds, "caption", [a], "By hand.")  # edits apply live over the cached join
    assert ViewData(ds).panel(a)["manifest"]["caption"] == "By hand."
    assert list((ds.root / "cache").glob("manifest-*.parquet")) == [cached]
    ds.write_part("quality", {"image_id": [a], "model": ["head2"], "status": ["ok"], "error": [None],
                              "message": [None], "created_at": [now()], "rank": [9], "probs": [[0.1] * 10]})
    again = ViewData(ds)  # a new part: joined anew, the old file goes
    assert again.grid(f"image_id = '{a}'")["rows"][0]["rank"] == 9
    assert not cached.exists()
    assert first.grid(f"image_id = '{a}'")["rows"][0]["rank"] == 9  # its file gone, the older page joins again
