"""Reference ingest: the dataset keeps where each image is, stages read it there, and a source
that moved or changed since ingest becomes an error row, never another image's pixels."""
import os
import tarfile

import pytest
from conftest import encode_image, make_image, run_cli

from curate.images import ImageError
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.storage import read_referenced
from curate.store import Dataset


def by_name(table) -> dict[str, dict]:
    return {r["source"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}


def stats_of(ds: Dataset) -> dict[str, dict]:
    run(ds, StatsStage(), show_progress=False)
    names = {r["image_id"]: r["source"].rsplit("/", 1)[-1] for r in ds.read("images").to_pylist() if r["image_id"]}
    return {names[r["image_id"]]: r for r in ds.read("stats").to_pylist()}


def folder_bytes(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def test_a_referenced_dataset_stores_locators_and_stages_see_the_same_pixels(image_dir, tmp_path):
    for i in range(3):  # big enough that a dataset of locators can be held to 1% of the images
        (image_dir / f"big{i}.bmp").write_bytes(encode_image(make_image(1400, 1200, seed=20 + i), "BMP"))
    copied, referenced = Dataset(tmp_path / "copy", create=True), Dataset(tmp_path / "ref", create=True)
    ingest([str(image_dir)], copied, show_progress=False)
    ingest([str(image_dir)], referenced, show_progress=False, reference=True)
    rows = by_name(referenced.read("images"))
    assert all(r["bytes"] is None for r in rows.values())
    big = rows["big0.bmp"]
    assert big["location"] == str(image_dir / "big0.bmp") and big["location_offset"] is None
    assert (big["location_size"], big["location_mtime_ns"]) == (os.stat(image_dir / "big0.bmp").st_size,
                                                                os.stat(image_dir / "big0.bmp").st_mtime_ns)
    # a duplicate (nested/img01.jpg is walked after copy_of_img01.jpg): the first copy is the one read
    assert rows["img01.jpg"]["location"] is None and rows["copy_of_img01.jpg"]["location"]
    assert rows["broken.jpg"]["error"] == "unidentified"
    assert folder_bytes(referenced.root) < 0.01 * folder_bytes(image_dir) < 0.011 * folder_bytes(copied.root)
    strip = ["created_at", "model"]
    assert ({k: {c: v for c, v in r.items() if c not in strip} for k, r in stats_of(referenced).items()}
            == {k: {c: v for c, v in r.items() if c not in strip} for k, r in stats_of(copied).items()})


def test_moved_truncated_and_rewritten_sources_become_error_rows(image_dir, tmp_path):
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(image_dir)], ds, show_progress=False, reference=True)
    os.rename(image_dir / "img00.png", tmp_path / "moved.png")
    with open(image_dir / "img02.jpg", "r+b") as f:
        f.truncate(100)
    (image_dir / "nested" / "img03.png").write_bytes(encode_image(make_image(300, 300, seed=99), "PNG"))
    # the same size and modification time, other bytes: only the hash on read can tell
    same = image_dir / "img04.jpg"
    before, data = os.stat(same), bytearray(same.read_bytes())
    data[-3] ^= 0xFF
    same.write_bytes(bytes(data))
    os.utime(same, ns=(before.st_atime_ns, before.st_mtime_ns))
    stats = stats_of(ds)
    assert stats["img00.png"]["error"] == "source_missing"
    assert [stats[n]["error"] for n in ["img02.jpg", "img03.png", "img04.jpg"]] == ["source_changed"] * 3
    assert all(r["status"] == "ok" for n, r in stats.items() if n not in {"img00.png", "img02.jpg", "img03.png",
                                                                         "img04.jpg"})
    assert len(stats) == 12  # every distinct ok image has its row


def test_tar_members_read_by_offset_are_the_archives_bytes(image_dir, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:  # a webdataset shard: an uncompressed tar
        for path in sorted(image_dir.rglob("img*")):
            tar.add(path, arcname=f"{path.stem}.{path.suffix[1:]}")
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(shard)], ds, show_progress=False, reference=True)
    rows = [r for r in ds.read("images").to_pylist() if r["status"] == "ok"]
    with tarfile.open(shard) as tar:
        members = {f"{shard}::{m.name}": tar.extractfile(m).read() for m in tar}
    assert len(rows) == 12 and all(r["location"] == str(shard) and r["location_offset"] for r in rows)
    assert all(read_referenced(r) == members[r["source"]] for r in rows)
    assert all(r["status"] == "ok" for r in stats_of(ds).values())
    with open(shard, "ab") as f:  # a shard written again (appended to) is a changed source for every member
        f.write(b"\0" * 10240)
    with pytest.raises(ImageError, match="source_changed"):
        read_referenced(rows[0])


def test_cli_reference_and_copy(image_dir, tmp_path):
    run_cli("ingest", "--reference", str(image_dir), str(tmp_path / "ref"))
    run_cli("ingest", str(image_dir), str(tmp_path / "copy"))  # --copy is the default
    ref, copy = Dataset(tmp_path / "ref").read("images"), Dataset(tmp_path / "copy").read("images")
    assert ref.column("bytes").null_count == ref.num_rows and ref.column("location").null_count < ref.num_rows
    assert copy.column("location").null_count == copy.num_rows and copy.column("bytes").null_count < copy.num_rows


def test_the_view_shows_referenced_images_and_never_a_changed_one(image_dir, tmp_path):
    from curate.thumbs import make_thumbs
    from curate.web import image_bytes

    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(image_dir)], ds, show_progress=False, reference=True)
    ids = {r["source"].rsplit("/", 1)[-1]: r["image_id"] for r in ds.read("images").to_pylist() if r["status"] == "ok"}
    assert image_bytes(ds, ids["img00.png"]) == ((image_dir / "img00.png").read_bytes(), "image/png")
    (image_dir / "img02.jpg").write_bytes(encode_image(make_image(100, 100, seed=7)))
    thumbs = make_thumbs(ds, list(ids.values()))
    assert thumbs[ids["img02.jpg"]] is None and image_bytes(ds, ids["img02.jpg"]) is None
    assert all(path is not None and path.exists() for name, path in ((n, thumbs[i]) for n, i in ids.items())
               if name != "img02.jpg")


def test_export_reads_referenced_tar_members_at_their_offsets(image_dir, tmp_path):
    from curate.pipelines.export import export

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in sorted(image_dir.rglob("img*")):
            tar.add(path, arcname=f"{path.stem}.{path.suffix[1:]}")
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(shard)], ds, show_progress=False, reference=True)
    summary = export(ds, tmp_path / "out", "imagefolder", show_progress=False)
    assert summary["unavailable"] == []
    exported = sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.suffix in (".jpg", ".png"))
    assert exported == sorted(p.read_bytes() for p in image_dir.rglob("img*"))
