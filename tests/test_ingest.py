"""Ingest's fast path: hash first (a copy is never decoded), verify without making pixels to
throw away, read EXIF without decoding, stream parts to disk a row group at a time."""
import shutil
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode_image, make_image
from hostile import build_corpus, exif_jpeg, orient, photo
from PIL import Image

import curate.pipelines.ingest as ingest_module
from curate.images import ImageError, decode, probe, read_file, verify
from curate.pipelines.ingest import ingest
from curate.store import Dataset, PartWriter, now


def counting(monkeypatch, module, name: str) -> list:
    """Count the calls of module.name (the real function still runs)."""
    calls, real = [], getattr(module, name)

    def counted(data, *args, **kw):
        calls.append(len(data))
        return real(data, *args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_copy_is_never_decoded(tmp_path, monkeypatch, in_process):
    src = tmp_path / "src"
    src.mkdir()
    jpg, png = encode_image(make_image(320, 240, seed=1)), encode_image(make_image(200, 300, seed=2), "PNG")
    for k in range(4):  # one batch: the copies are prepared at once on the decode threads
        (src / f"a{k}.jpg").write_bytes(jpg)
    (src / "b.png").write_bytes(png)
    (src / "b_copy.png").write_bytes(png)
    verified = counting(monkeypatch, ingest_module, "verify")
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(src)], ds, show_progress=False)
    assert sorted(verified) == sorted([len(jpg), len(png)]) and summary.counts["duplicate"] == 4
    # a copy of a stored image, in a later run: its header says its size, nothing is verified
    (tmp_path / "later").mkdir()
    shutil.copyfile(src / "b.png", tmp_path / "later" / "again.png")
    probed = counting(monkeypatch, ingest_module, "probe")
    ingest([str(tmp_path / "later")], ds, show_progress=False)
    assert len(verified) == 2 and probed == [len(png)]
    rows = {r["source"].rsplit("/", 1)[1]: r for r in ds.read("images").to_pylist()}
    assert rows["again.png"]["status"] == "ok" and rows["again.png"]["bytes"] is None
    assert [(r["width"], r["height"], r["format"]) for r in rows.values()].count((200, 300, "PNG")) == 3
    assert sum(r["bytes"] is not None for r in rows.values()) == 2


def test_verify_gives_every_hostile_file_the_verdict_decoding_gives(tmp_path):
    expected, _ = build_corpus(tmp_path / "corpus")
    checked = 0
    for name in expected:
        path = tmp_path / "corpus" / name
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        outcomes = []
        for check in (verify, decode):
            try:
                result = check(data)
                outcomes.append(("ok", result.width, result.height, result.format, result.mode, result.animated))
            except ImageError as e:
                outcomes.append((e.code,))
        assert outcomes[0] == outcomes[1], name
        checked += 1
    assert checked >= 30


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_exif(orientation: int, after_pixels: bool) -> bytes:
    """The hostile photo as a PNG whose eXIf chunk (orientation) comes before or after the pixel data."""
    png = encode_image(Image.fromarray(photo()), "PNG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    chunk = png_chunk(b"eXIf", exif.tobytes())
    if after_pixels:
        end = png.index(b"IEND") - 4
        return png[:end] + chunk + png[end:]
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("after_pixels", [False, True])
def test_png_exif_orientation(after_pixels):
    data = png_with_exif(6, after_pixels)
    d = decode(data)
    assert (d.width, d.height) == (photo().shape[0], photo().shape[1])
    assert (orient(photo(), 6) == d.pixels()).all()
    assert (probe(data).width, verify(data).height) == (d.width, d.height)


def test_png_header_and_exif_are_read_without_inflating_the_pixels():
    data = png_with_exif(6, after_pixels=False)
    start = data.index(b"IDAT") + 4
    broken = data[:start] + bytes(b ^ 0xFF for b in data[start:start + 20]) + data[start + 20:]
    header = probe(broken)  # the pixels are never inflated, so the damage is not seen
    assert (header.width, header.height, header.orientation) == (photo().shape[0], photo().shape[1], 6)
    for check in (verify, decode):  # verification and decoding both fail it (a chunk CRC, the zlib stream)
        with pytest.raises(ImageError) as e:
            check(broken)
        assert e.value.code == "truncated"


def test_jpeg_verify_reads_every_scan_byte_at_the_smallest_scale():
    big = encode_image(make_image(1600, 1200), "JPEG", quality=90)
    assert (verify(big).width, verify(big).height) == (1600, 1200)
    with pytest.raises(ImageError, match="truncated"):
        verify(big[: len(big) * 3 // 4])  # cut inside the scan: caught at 1/8 scale too
    rotated = verify(exif_jpeg(photo(), 6))
    assert (rotated.width, rotated.height, rotated.format) == (photo().shape[0], photo().shape[1], "JPEG")


def test_part_writer_streams_row_groups_to_disk_before_the_part_is_whole(tmp_path):
    ds = Dataset(tmp_path / "ds", create=True)
    folder = ds.table_dir("stats")
    rows = pa.Table.from_pylist([{"image_id": f"{i:064x}", "model": "m", "status": "ok", "created_at": now()}
                                 for i in range(1500)], schema=ds.read("stats").schema)
    with PartWriter(ds, "stats") as writer:
        writer.add(rows)  # more than a row group (1024 rows), less than a part (2048)
        on_disk = list(folder.glob(".tmp-*"))
        assert len(on_disk) == 1 and on_disk[0].stat().st_size > 0 and not ds.parts("stats")
        assert writer.group_rows == 1500 - 1024  # only the next row group's rows are held
    (part,) = ds.parts("stats")
    assert pq.read_metadata(part).num_rows == 1500 and pq.read_metadata(part).num_row_groups == 2
    assert not list(folder.glob(".tmp-*"))
    assert read_file(part)  # a whole Parquet file
