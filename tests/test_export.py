"""`curate export`: kohya, imagefolder, webdataset and parquet, proved with the libraries and
trainers' own readers (datasets, webdataset, tomllib), round trips back into a dataset,
re-export, link modes, interrupted exports and the mistakes a user makes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tomllib

import curate.pipelines.export_formats as export_formats
from curate.pipelines.export import ExportError, export
from curate.pipelines.ingest import ingest
from curate.store import Dataset
from tests.conftest import encode_image, make_image, run_cli

# The keys sd-scripts documents for a dataset config (docs/config_README-en.md), by table.
KOHYA_GENERAL = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                 "min_bucket_reso", "resolution", "skip_image_resolution", "color_aug", "face_crop_aug_range",
                 "flip_aug", "keep_tokens", "num_repeats", "random_crop", "shuffle_caption", "caption_prefix",
                 "caption_suffix", "caption_separator", "keep_tokens_separator", "secondary_separator",
                 "enable_wildcard", "resize_interpolation", "caption_extension", "cache_info",
                 "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate"}
KOHYA_SUBSET = KOHYA_GENERAL - {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket",
                                "max_bucket_reso", "min_bucket_reso", "resolution", "skip_image_resolution"} \
    | {"image_dir", "class_tokens", "is_reg", "metadata_file"}


@pytest.fixture
def source(tmp_path) -> Path:
    """Images with the kinds of text users have: caption and tags, tags, a caption, nothing."""
    src = tmp_path / "src"
    src.mkdir()
    texts = ["A red kite over a beach ||| kite, beach, sky, outdoors", "1girl, solo, long_hair, smile",
             "A bowl of ramen on a wooden table, with steam rising.", None, "A dog on a sofa ||| dog, sofa, indoors"]
    for i, text in enumerate(texts):
        fmt, ext = ("PNG", "png") if i == 1 else ("JPEG", "jpg")
        (src / f"img{i}.{ext}").write_bytes(encode_image(make_image(96 + 16 * i, 80, seed=i), fmt))
        if text is not None:
            (src / f"img{i}.txt").write_text(text)
    return src


@pytest.fixture
def ds(source, tmp_path) -> Dataset:
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(source)], ds, show_progress=False)
    return ds


def manifest_text(ds: Dataset) -> dict[str, tuple]:
    return {r["image_id"]: (r["caption"], r["tags"]) for r in
            ds.query("SELECT image_id, caption, tags FROM manifest").to_pylist()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_kohya_export_parses_and_round_trips(ds, tmp_path):
    dest = tmp_path / "kohya"
    summary = export(ds, dest, "kohya", show_progress=False)
    assert summary["exported"] == 5 and summary["without text"] == 1 and not summary["unavailable"]
    config = tomllib.loads((dest / "dataset.toml").read_text())
    assert set(config["general"]) <= KOHYA_GENERAL
    assert config["general"]["caption_extension"] == ".txt" and config["general"]["keep_tokens_separator"] == "|||"
    (dataset,) = config["datasets"]
    assert set(dataset) - {"subsets"} <= KOHYA_GENERAL and dataset["resolution"] == 1024
    (subset,) = dataset["subsets"]
    assert set(subset) <= KOHYA_SUBSET
    images = Path(subset["image_dir"])
    assert images.is_absolute() and images == (dest / "images").resolve()
    text = manifest_text(ds)
    for image_id, (caption, tags) in text.items():
        (image,) = [p for p in images.glob(f"{image_id}.*") if p.suffix != ".txt"]
        assert sha(image.read_bytes()) == image_id  # the bytes as ingested
        line = (images / f"{image_id}.txt").read_text()
        assert line.count("\n") == 1  # sd-scripts reads the first line only
        assert line.strip() == (f"{caption or ''} ||| {', '.join(tags or [])}".strip() if caption or tags else "")
    assert (images / f"{next(iter(text))}.txt").read_text()  # not empty
    # round trip: the export ingested into a new dataset gives the same captions and tags
    back = Dataset(tmp_path / "back", create=True)
    ingest([str(dest)], back, show_progress=False)
    assert manifest_text(back) == text


def test_imagefolder_loads_with_datasets(ds, tmp_path):
    import datasets

    dest = tmp_path / "hf"
    export(ds, dest, "imagefolder", prompt="both", show_progress=False)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train")
    assert len(loaded) == 5 and isinstance(loaded.features["image"], datasets.Image)
    text = manifest_text(ds)
    for row in loaded:
        row["image"].load()  # decodes
        caption, tags = text[row["image_id"]]
        assert (row["caption"], row["tags"]) == (caption, tags)
        expected = caption if not tags else ", ".join(tags) if not caption else \
            f"{caption}{' ' if caption[-1] == '.' else ', '}{', '.join(tags)}"
        assert row["text"] == (expected or "")
    # and back: `hf:DEST` goes through datasets.load_dataset, whose imagefolder rows hold file paths
    back = Dataset(tmp_path / "back", create=True)
    assert ingest([f"hf:{dest}"], back, show_progress=False).ok == 5
    assert manifest_text(back) == text


def test_webdataset_shards_iterate_and_decode(ds, tmp_path):
    import webdataset as wds

    dest = tmp_path / "wds"
    sizes = {r["image_id"]: r["size_bytes"] for r in ds.query("SELECT image_id, size_bytes FROM manifest").to_pylist()}
    cap = max(sizes.values()) + 1
    summary = export(ds, dest, "webdataset", shard_mb=cap / (1 << 20), show_progress=False)
    shards = sorted(dest.glob("*.tar"))
    assert summary["shards written"] == len(shards) >= 2
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 5
    text = manifest_text(ds)
    for sample in samples:
        image = sample.get("jpg") or sample.get("png")
        assert image.size[1] == 80  # decoded
        assert (sample["json"]["caption"], sample["json"]["tags"]) == text[sample["__key__"]]
    for shard in shards:  # capped: a shard holds at most `cap` bytes of images
        keys = pq.read_table(shard.with_suffix(".parquet")).column("key").to_pylist()
        assert sum(sizes[k] for k in keys) <= cap
    back = Dataset(tmp_path / "back", create=True)
    ingest([str(dest)], back, show_progress=False)
    assert manifest_text(back) == text


def test_parquet_export_has_rows_and_image_bytes(ds, tmp_path):
    import datasets

    dest = tmp_path / "pq"
    export(ds, dest, "parquet", prompt="tags", show_progress=False)
    loaded = datasets.load_dataset("parquet", data_files=str(dest / "*.parquet"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image) and len(loaded) == 5
    columns = set(ds.query("SELECT * FROM manifest LIMIT 0").column_names)
    assert columns <= set(loaded.column_names)
    raw = pq.read_table(dest / "part-00000.parquet")
    for row in raw.to_pylist():
        assert sha(row["image"]["bytes"]) == row["image_id"] and row["text"] == ", ".join(row["tags"] or [])


def test_reexport_adds_what_is_new_and_refreshes_text(ds, source, tmp_path):
    dest = tmp_path / "kohya"
    first = export(ds, dest, "kohya", where="width < 140", show_progress=False)
    assert first["exported"] == 3
    before = {p.name: p.stat().st_ino for p in (dest / "images").iterdir()}
    (source / "img0.txt").write_text("A blue kite over a beach ||| kite, beach")
    ingest([str(source)], ds, show_progress=False)
    again = export(ds, dest, "kohya", show_progress=False)
    assert (again["exported"], again["already there"]) == (2, 3)
    after = {p.name: p.stat().st_ino for p in (dest / "images").iterdir()}
    kept = [n for n in before if not n.endswith(".txt")]
    assert all(after[n] == before[n] for n in kept)  # images already there are not written again
    edited = next(i for i, (c, _) in manifest_text(ds).items() if c and "blue" in c)
    assert (dest / "images" / f"{edited}.txt").read_text() == "A blue kite over a beach ||| kite, beach\n"
    runs = json.loads((dest / ".curate-export.json").read_text())["runs"]
    assert [r["added"] for r in runs] == [3, 2] and runs[0]["where"] == "width < 140"
    assert export(ds, dest, "kohya", show_progress=False)["exported"] == 0
    # webdataset: a new shard for the new images only
    wds = tmp_path / "wds"
    export(ds, wds, "webdataset", where="width < 140", show_progress=False)
    assert export(ds, wds, "webdataset", show_progress=False)["shards written"] == 1
    counts = [len(pq.read_table(p)) for p in sorted(wds.glob("*.parquet"))]
    assert counts == [3, 2]


def test_an_interrupted_export_shows_no_half_file_and_finishes(ds, tmp_path, monkeypatch):
    """Killed after a few files (renames stop; the temporaries stay, as after kill -9): every
    visible file is whole, and the next export completes to what a clean one writes."""
    dest, clean = tmp_path / "cut", tmp_path / "clean"
    real_replace, renames = os.replace, []

    def dying_replace(src, dst):
        if len(renames) == 4:
            raise KeyboardInterrupt
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(export_formats.os, "replace", dying_replace)
    monkeypatch.setattr(export_formats.Path, "unlink", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        export(ds, dest, "kohya", show_progress=False)
    monkeypatch.undo()
    visible = [p for p in (dest / "images").iterdir() if not p.name.startswith(".")]
    assert 0 < len(visible) < 10 and any(p.name.startswith(".tmp-") for p in (dest / "images").iterdir())
    for p in visible:
        if p.suffix != ".txt":
            assert sha(p.read_bytes()) == p.stem
    for tmp in (dest / "images").glob(".tmp-*"):  # as left by a process that no longer runs
        tmp.rename(tmp.with_name(".tmp-999999999-" + tmp.name.split("-", 3)[-1]))
    export(ds, dest, "kohya", show_progress=False)
    export(ds, clean, "kohya", show_progress=False)
    listing = sorted((p.name, p.read_bytes()) for p in (dest / "images").iterdir())
    assert listing == sorted((p.name, p.read_bytes()) for p in (clean / "images").iterdir())


def test_link_modes(ds, source, tmp_path):
    hard = export(ds, tmp_path / "hard", "imagefolder", link="hard", show_progress=False)
    assert hard["linked"] == 5
    src = source / "img0.jpg"
    image_id = sha(src.read_bytes())
    assert (tmp_path / "hard" / f"{image_id}.jpg").stat().st_ino == src.stat().st_ino
    src.write_bytes(encode_image(make_image(96, 80, seed=99)))  # the source changed since ingest
    sym = export(ds, tmp_path / "sym", "kohya", link="sym", show_progress=False)
    assert (sym["linked"], sym["copied"]) == (4, 1)
    out = tmp_path / "sym" / "images"
    assert not (out / f"{image_id}.jpg").is_symlink() and sha((out / f"{image_id}.jpg").read_bytes()) == image_id
    other = sha((source / "img2.jpg").read_bytes())
    assert os.readlink(out / f"{other}.jpg") == str(source / "img2.jpg")


def test_bytes_no_longer_available(ds, source, tmp_path):
    """A dataset without an image's bytes (a lost part; a reference to a moved file): taken
    from a source that still holds the same bytes, else named in the error after the rest."""
    table = ds.read("images")
    (part,) = ds.parts("images")
    part.unlink()
    gone = table.column("source").to_pylist().index(str(source / "img2.jpg"))
    keep = table.column("source").to_pylist().index(str(source / "img3.jpg"))
    bytes_ = table.column("bytes").to_pylist()
    bytes_[gone] = bytes_[keep] = None
    ds.write_part("images", table.set_column(table.schema.get_field_index("bytes"), "bytes",
                                             [bytes_]))
    (source / "img2.jpg").unlink()
    proc = run_cli("export", str(ds.root), str(tmp_path / "out"), "--format", "imagefolder", "-q", check=False)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "1 image(s) not exported: their bytes are no longer available" in err
    assert str(source / "img2.jpg") in err and "Traceback" not in err
    assert "copied from the source │ 1" in proc.stdout
    assert len(list((tmp_path / "out").glob("*.jpg"))) + len(list((tmp_path / "out").glob("*.png"))) == 4


def test_mistakes_are_one_line(ds, tmp_path):
    def fails(*args) -> str:
        proc = run_cli("export", str(ds.root), *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        return " ".join(proc.stderr.split())

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.pdf").write_bytes(b"%PDF")
    assert "is not empty and holds no curate export" in fails(str(busy))
    assert "did you mean 'webdataset'?" in fails(str(tmp_path / "a"), "--format", "webdatset")
    for kw, message in (({"prompt": "captions"}, "did you mean 'caption'?"),
                        ({"fmt": "koyha"}, "did you mean 'kohya'?"),
                        ({"fmt": "parquet", "link": "hard"}, "--link hard needs image files")):
        with pytest.raises(ExportError, match=message):
            export(ds, tmp_path / "a", **kw)
    export(ds, tmp_path / "k", "kohya", show_progress=False)
    with pytest.raises(ExportError, match="holds a kohya export with --prompt both"):
        export(ds, tmp_path / "k", "kohya", prompt="tags")
    with pytest.raises(ExportError, match="holds a kohya export"):
        export(ds, tmp_path / "k", "imagefolder")
    ok = run_cli("export", str(ds.root), str(tmp_path / "k"), "--format", "kohya")
    assert "already there │ 5" in ok.stdout
