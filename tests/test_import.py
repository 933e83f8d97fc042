"""Ingest imports the captions and tags users already have: folders laid out as kohya,
EveryDream2 and img2dataset lay them out, webdataset shards, Hugging Face datasets."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipelines.ingest import ingest
from curate.pipelines.sidecars import read_text
from curate.store import Dataset, now
from tests.conftest import encode_image, make_image, run_cli


def jpeg(seed: int, size=(96, 64)) -> bytes:
    return encode_image(make_image(*size, seed=seed))


def text_of(ds: Dataset) -> dict[str, tuple]:
    """source -> (caption, tags) from the manifest, as the trainer and --where see them."""
    rows = ds.query("SELECT unnest(sources) AS source, caption, tags FROM manifest").to_pylist()
    return {Path(r["source"]).name if "::" not in r["source"] else r["source"].split("::", 1)[1]:
            (r["caption"], r["tags"]) for r in rows}


def imported(ds: Dataset, table: str) -> list[dict]:
    return ds.query(f"SELECT * FROM {table} WHERE model LIKE 'import:%' ORDER BY message").to_pylist()


def test_text_reading_rule():
    assert read_text("1girl, solo, long hair, looking at viewer", "auto") == \
        (None, ["1girl", "solo", "long hair", "looking at viewer"])
    assert read_text("A cozy kitchen with pots, pans, and a kettle on the stove.", "auto") == \
        ("A cozy kitchen with pots, pans, and a kettle on the stove.", None)
    assert read_text("a woman in a red dress, standing in a field", "auto")[1] is None  # two pieces: a caption
    assert read_text("a photo of cloud strife holding a sword, low angle shot, outdoors\n", "auto") == \
        ("a photo of cloud strife holding a sword", ["low angle shot", "outdoors"])
    assert read_text("A cat on a mat.  ||| tabby, indoors, \\(cat\\)", "auto") == \
        ("A cat on a mat.", ["tabby", "indoors", "(cat)"])
    assert read_text("!?, ..., smile", "auto") == (None, ["!?", "...", "smile"])  # booru tags that are punctuation
    assert read_text("red, green, blue", "caption") == ("red, green, blue", None)
    assert read_text("a single tag", "tags") == (None, ["a single tag"])


def test_kohya_folders(tmp_path):
    """sd-scripts' DreamBooth layout: `N_concept` folders, a .txt of tags or a caption per image."""
    root = tmp_path / "train"
    concept = root / "10_sks dog"
    concept.mkdir(parents=True)
    (concept / "001.jpg").write_bytes(jpeg(1))
    (concept / "001.txt").write_text("sks dog, solo, outdoors, grass\n", encoding="utf-8")
    (concept / "002.png").write_bytes(encode_image(make_image(64, 64, seed=2), "PNG"))
    (concept / "002.txt").write_text("\ufeffA photo of sks dog sitting on a red couch.", encoding="utf-8")
    (concept / "003.jpg").write_bytes(jpeg(3))  # no caption file: no text rows
    (root / "notes.txt").write_text("not beside any image")
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(root)], ds, show_progress=False)
    assert summary.ok == 3 and summary.counts == {"captions imported": 1, "tags imported": 1}
    text = text_of(ds)
    assert text["001.jpg"] == (None, ["sks dog", "solo", "outdoors", "grass"])
    assert text["002.png"] == ("A photo of sks dog sitting on a red couch.", None)
    assert text["003.jpg"] == (None, None)
    # --where and the model value see the import as they see a model's output
    assert len(ds.select_ids("list_contains(tags, 'outdoors')")) == 1
    tags = imported(ds, "tags")[0]
    assert tags["model"] == "import:sidecar@ext=txt,as=auto" and tags["message"] == str(concept / "001.txt")
    assert imported(ds, "captions")[0]["raw"] == "A photo of sks dog sitting on a red couch."


def test_everydream2_folders(tmp_path):
    """EveryDream2: nested folders, .txt ('main prompt, tag, tag'), .caption and per-image .yaml."""
    root = tmp_path / "ed2"
    (root / "characters" / "cloud").mkdir(parents=True)
    (root / "scenery").mkdir()
    (root / "characters" / "cloud" / "a.jpg").write_bytes(jpeg(10))
    (root / "characters" / "cloud" / "a.yaml").write_text(
        "main_prompt: A portrait of Cloud Strife\ntags:\n  - tag: low angle shot\n  - tag: holding buster sword\n"
        "    weight: 1.5\n  - smiling\nmax_caption_length: 1024\n")
    (root / "characters" / "cloud" / "a.txt").write_text("ignored: the yaml comes first")
    (root / "characters" / "cloud" / "b.jpg").write_bytes(jpeg(11))
    (root / "characters" / "cloud" / "b.txt").write_text(
        "cloud strife standing on a dirt path in midgar, screenshot, ps5, dramatic lighting")
    (root / "scenery" / "c.webp").write_bytes(encode_image(make_image(80, 60, seed=12), "WEBP"))
    (root / "scenery" / "c.caption").write_text("a quiet lake at dawn, mist over the water")
    (root / "scenery" / "d.jpg").write_bytes(jpeg(13))
    (root / "scenery" / "d.yaml").write_text("main_prompt: [oops\n")  # broken YAML
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(root)], ds, show_progress=False)
    assert summary.counts == {"captions imported": 3, "tags imported": 2, "side files unreadable": 1}
    text = text_of(ds)
    assert text["a.jpg"] == ("A portrait of Cloud Strife", ["low angle shot", "holding buster sword", "smiling"])
    assert text["b.jpg"] == ("cloud strife standing on a dirt path in midgar",
                             ["screenshot", "ps5", "dramatic lighting"])
    assert text["c.webp"] == ("a quiet lake at dawn, mist over the water", None)
    weights = {r["message"]: r["tag_scores"] for r in imported(ds, "tags")}
    assert weights[str(root / "characters" / "cloud" / "a.yaml")] == [1.0, 1.5, 1.0]
    bad = [r for r in imported(ds, "captions") if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["error"] == "bad_sidecar" and "d.yaml: not valid YAML" in bad[0]["message"]
    # a second ingest adds nothing, the broken file's error row included
    assert ingest([str(root)], ds, show_progress=False).counts == {}
    assert len(imported(ds, "captions")) == 4


def write_shard(path: Path, samples: list[tuple[str, bytes, str | None, dict | None]]):
    """A tar in webdataset's layout: each sample's members one after another under its key."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta in samples:
            members = [(f"{key}.jpg", image)] + ([(f"{key}.txt", caption.encode())] if caption is not None else []) \
                + ([(f"{key}.json", json.dumps(meta).encode())] if meta is not None else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def img2dataset_parquet(path: Path, keys: list[str], captions: list[str]):
    pq.write_table(pa.table({"url": [f"https://example.com/{k}.jpg" for k in keys], "key": keys,
                             "status": ["success"] * len(keys), "error_message": [None] * len(keys),
                             "caption": captions, "width": [96] * len(keys), "height": [64] * len(keys)}), path)


def test_img2dataset_shards_and_files(tmp_path):
    """img2dataset's webdataset output (tar + parquet per shard) and its files output (a
    folder of samples per shard, parquet beside it); a plain webdataset with .txt only."""
    out = tmp_path / "laion"
    out.mkdir()
    keys = ["000000000", "000000001", "000000002"]
    captions = ["A dog, a ball, and a park", "Stock photo - red, white, blue", "Sunset over the sea"]
    write_shard(out / "00000.tar", [(k, jpeg(20 + i), c, {"key": k, "caption": c, "url": f"https://example.com/{k}.jpg"})
                                    for i, (k, c) in enumerate(zip(keys, captions))])
    img2dataset_parquet(out / "00000.parquet", keys, captions)
    files = out / "00001"
    files.mkdir()
    (files / "000010000.jpg").write_bytes(jpeg(30))
    img2dataset_parquet(out / "00001.parquet", ["000010000"], ["A bowl of ramen, close up, steam rising"])
    write_shard(tmp_path / "plain.tar", [("s0", jpeg(40), "a lighthouse on a cliff", None),
                                         ("s1", jpeg(41), None, None)])
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(out), str(tmp_path / "plain.tar")], ds, show_progress=False)
    assert summary.ok == 6 and summary.counts == {"captions imported": 5}
    text = text_of(ds)
    # the JSON's caption is read, not the same text again from .txt (which would read as tags)
    assert text["000000001.jpg"] == ("Stock photo - red, white, blue", None)
    assert text["000010000.jpg"] == ("A bowl of ramen, close up, steam rising", None)  # from the parquet
    assert text["s0.jpg"] == ("a lighthouse on a cliff", None) and text["s1.jpg"] == (None, None)
    rows = {r["message"]: r for r in imported(ds, "captions")}
    from_parquet = rows[f"{out / '00001.parquet'}#000010000"]
    assert from_parquet["model"] == "import:img2dataset@column=caption"
    assert json.loads(from_parquet["raw"])["url"] == "https://example.com/000010000.jpg"
    assert rows[f"{out / '00000.tar'}::000000002.json"]["model"] == "import:sidecar@ext=json"


def test_reingest_is_idempotent_and_edits_are_new_rows(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(1))
    (root / "a.txt").write_text("1girl, solo, long hair")
    (root / "b.jpg").write_bytes(jpeg(2))
    (root / "copy").mkdir()
    (root / "copy" / "a.jpg").write_bytes(jpeg(1))  # the same image with another caption
    (root / "copy" / "a.txt").write_text("A second opinion about the same picture.")
    ds = Dataset(tmp_path / "ds", create=True)
    assert ingest([str(root)], ds, show_progress=False).counts == \
        {"duplicate": 1, "captions imported": 1, "tags imported": 1}
    assert ingest([str(root)], ds, show_progress=False).counts == {}
    # an edited side file of an image stored earlier is a new row, and the manifest shows it
    (root / "a.txt").write_text("1girl, solo, short hair")
    assert ingest([str(root)], ds, show_progress=False).counts == {"tags imported": 1}
    assert text_of(ds)["a.jpg"][1] == ["1girl", "solo", "short hair"]
    # back to the first text: new again (the latest row of that file differs)
    (root / "a.txt").write_text("1girl, solo, long hair")
    assert ingest([str(root)], ds, show_progress=False).counts == {"tags imported": 1}
    assert text_of(ds)["a.jpg"][1] == ["1girl", "solo", "long hair"]
    # a side file added to an image ingested before it existed
    (root / "b.txt").write_text("a bright red apple on a table")
    assert ingest([str(root)], ds, show_progress=False).counts == {"captions imported": 1}
    assert ingest([str(root)], ds, show_progress=False).counts == {}
    assert len(imported(ds, "tags")) == 3 and len(imported(ds, "captions")) == 2
    # --sidecar-text is part of the model value: another reading is new work
    assert ingest([str(root)], ds, show_progress=False, sidecar_text="caption").counts == {"captions imported": 3}
    assert {r["model"] for r in imported(ds, "captions")} >= {"import:sidecar@ext=txt,as=caption"}


def test_killed_ingest_resumes_to_the_same_imports(tmp_path):
    """Images written, side rows not (a kill between the two parts): the rerun imports them."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg(i))
        (root / f"{i}.txt").write_text(f"tag{i}, solo, outdoors")
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(root)], ds, show_progress=False)
    for part in ds.parts("tags"):
        part.unlink()
    assert ingest([str(root)], ds, show_progress=False).counts == {"tags imported": 3}
    assert sorted(t[1][0] for t in text_of(ds).values()) == ["tag0", "tag1", "tag2"]


def hf_dataset(n: int, offset: int = 0):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "labels": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": jpeg(50 + offset + i), "path": None} for i in range(n)],
        "prompt": [f"a picture of thing {offset + i}" for i in range(n)],
        "labels": [f"thing_{offset + i}, solo" for i in range(n)],
        "text": ["unused"] * n}, features=features)


def test_hugging_face_saved_dataset_and_parquet(tmp_path):
    import datasets

    datasets.DatasetDict({"train": hf_dataset(3), "test": hf_dataset(1, offset=10)}).save_to_disk(tmp_path / "saved")
    hf_dataset(2, offset=20).to_parquet(tmp_path / "shard.parquet")
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(tmp_path / "saved"), str(tmp_path / "shard.parquet")], ds, show_progress=False,
                     caption_column="prompt", tags_column="labels")
    assert summary.ok == 6 and summary.counts == {"captions imported": 6, "tags imported": 6}
    text = text_of(ds)
    assert text["train/2"] == ("a picture of thing 2", ["thing_2", "solo"])
    assert text["test/0"] == ("a picture of thing 10", ["thing_10", "solo"])
    assert text["1"] == ("a picture of thing 21", ["thing_21", "solo"])
    stored = ds.query("SELECT bytes FROM images WHERE source LIKE '%saved::train/1'").column("bytes")[0].as_py()
    assert stored == jpeg(51)
    assert {r["model"] for r in imported(ds, "captions")} == {"import:hf@column=prompt"}
    # a dataset of images alone
    hf_dataset(2, offset=30).select_columns(["image"]).save_to_disk(tmp_path / "bare")
    assert ingest([str(tmp_path / "bare")], ds, show_progress=False).ok == 2
    # without --caption-column the `text` column is the caption
    ds2 = Dataset(tmp_path / "ds2", create=True)
    ingest([str(tmp_path / "shard.parquet")], ds2, show_progress=False)
    assert {r["caption"] for r in imported(ds2, "captions")} == {"unused"}
    # `hf:` goes through datasets.load_dataset (a hub id where there is a network; here a folder)
    ds3 = Dataset(tmp_path / "ds3", create=True)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    hf_dataset(2).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    assert ingest([f"hf:{tmp_path / 'hub'}"], ds3, show_progress=False, caption_column="prompt").ok == 2


def test_hugging_face_mistakes_are_one_line(tmp_path):
    hf_dataset(1).to_parquet(tmp_path / "one.parquet")
    proc = run_cli("ingest", str(tmp_path / "one.parquet"), str(tmp_path / "ds"), "--caption-column", "captoin",
                   check=False)
    assert proc.returncode == 2 and "no column 'captoin' (--caption-column)" in proc.stderr
    assert "prompt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ds" / "tables" / "images").exists()  # nothing written
    proc = run_cli("ingest", f"hf:{tmp_path / 'nothing-here'}", str(tmp_path / "ds"), check=False)
    assert proc.returncode == 2 and "cannot load the Hugging Face dataset" in proc.stderr


def test_ray_engine_imports_the_same_rows(tmp_path, ray_cluster):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg(i))
        (root / f"{i}.txt").write_text(f"tag{i}, solo, outdoors" if i % 2 else f"A photo number {i}.")
    write_shard(tmp_path / "s.tar", [("k", jpeg(9), "a boat", None)])
    hf_dataset(2).save_to_disk(tmp_path / "saved")
    hf_dataset(1, offset=5).to_parquet(tmp_path / "one.parquet")
    sources = [str(root), str(tmp_path / "s.tar"), str(tmp_path / "saved"), str(tmp_path / "one.parquet")]
    results = []
    for engine in ("local", "ray"):
        ds = Dataset(tmp_path / engine, create=True)
        assert ingest(sources, ds, show_progress=False, engine=engine, caption_column="prompt").ok == 8
        results.append([ds.query(f"SELECT image_id, model, message, {column} FROM {table} ORDER BY image_id")
                        .to_pylist() for table, column in (("captions", "caption"), ("tags", "tags"))])
    assert results[0] == results[1] and len(results[0][0]) == 6 and len(results[0][1]) == 2


def test_the_trainer_reads_imported_text(tmp_path):
    from curate.trainer.config import load_config
    from curate.trainer.rows import load_rows

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(1))
    (root / "a.txt").write_text("A red kite over a beach ||| kite, beach, sky")
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(root)], ds, show_progress=False)
    image_id = ds.select_ids()[0]
    latent = np.zeros((4, 8, 8), np.float16).tobytes()
    ds.write_part("latents", {
        "image_id": [image_id], "model": ["vae"], "status": ["ok"], "error": [None], "message": [None],
        "created_at": [now()], "latent": [latent], "shape": [[4, 8, 8]], "scaling_factor": [0.13025],
        "original_height": [64], "original_width": [96], "resized_height": [64], "resized_width": [96],
        "crop_top": [0], "crop_left": [16], "target_height": [64], "target_width": [64], "mean": [None],
        "logvar": [None], "vae": ["vae"], "shift_factor": [None], "flip_latent": [None], "flip_mean": [None],
        "flip_logvar": [None], "flip_crop_left": [None]})
    row = load_rows(ds, load_config(None))[0]
    assert (row.caption, row.tags) == ("A red kite over a beach", ["kite", "beach", "sky"])


@pytest.mark.parametrize("bad", [b"\xff\xfe\x00broken", b"x" * 10])
def test_unreadable_side_file_is_an_error_row_not_a_stop(tmp_path, bad):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(1))
    (root / "a.json").write_bytes(bad)
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(root)], ds, show_progress=False)
    assert summary.ok == 1 and summary.counts == {"side files unreadable": 1}
    (row,) = imported(ds, "captions")
    assert row["error"] == "bad_sidecar" and row["model"] == "import:sidecar@ext=json"
