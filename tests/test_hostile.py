"""Ingest and the decoder against a hostile corpus: no crash, no hang, every file its
expected outcome, correct pixels for every mode, nothing written outside the dataset."""
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import encode_image, make_image, run_cli
from hostile import H, W, build_corpus, orient, photo
from PIL import Image

from curate.images import ImageError, decode, read_file, resize, shrink
from curate.store import Dataset

ESCAPES = ["escape_curate_test.jpg", "abs_escape_curate_test.jpg", "up_curate_test.png"]


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root (not following links) with its size and mtime, except skip."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            seen[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return seen


def relative(source: str, corpus: Path) -> str:
    return source.removeprefix(str(corpus) + "/")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected, references = build_corpus(root / "corpus")
    return root, expected, references


def test_hostile_corpus_every_file_its_outcome(corpus):
    root, expected, _ = corpus
    ds_dir = root / "ds"
    before = snapshot(root, ds_dir)
    # A subprocess with a timeout: a hang (FIFO, bomb, endless animation) fails the test.
    run_cli("ingest", str(root / "corpus"), str(ds_dir), "-q", timeout=120)
    assert snapshot(root, ds_dir) == before, "ingest wrote or touched something outside the dataset"
    for name in ESCAPES:
        assert not Path("/", name).exists() and not (root / name).exists() and not (root.parent / name).exists()

    rows = Dataset(ds_dir).read("images").to_pylist()
    got = {relative(r["source"], root / "corpus"): r for r in rows}
    assert len(got) == len(rows), "a source got more than one row"
    assert set(got) == set(expected)
    wrong = {n: (got[n]["status"], got[n]["error"], got[n]["message"]) for n in expected
             if (got[n]["status"], got[n]["error"]) != expected[n]}
    assert not wrong
    assert len(expected) >= 40

    for r in rows:
        if r["status"] == "ok":
            assert r["image_id"] and r["width"] > 0 and r["height"] > 0 and r["format"] and r["mode"]
        else:
            assert r["message"] and r["bytes"] is None
    assert got["animated.gif"]["animated"] and got["animated.webp"]["animated"]
    assert not got["orient1.jpg"]["animated"]
    assert got["png_named.jpg"]["format"] == "PNG" and got["no_extension"]["format"] == "PNG"
    for k in range(1, 9):  # width and height after EXIF orientation
        size = (got[f"orient{k}.jpg"]["width"], got[f"orient{k}.jpg"]["height"])
        assert size == ((H, W) if k >= 5 else (W, H))


def test_hostile_names_survive_sql(corpus):
    root, _, _ = corpus
    ds_dir = root / "ds"
    if not ds_dir.exists():
        run_cli("ingest", str(root / "corpus"), str(ds_dir), "-q", timeout=120)
    out = run_cli("sql", str(ds_dir), "SELECT source FROM images WHERE source LIKE '%DROP TABLE%'",
                  "--format", "json").stdout
    assert "it's \\\"quoted\\\"; DROP TABLE images; --.jpg" in out
    out = run_cli("sql", str(ds_dir), "SELECT count(*) AS n FROM images WHERE source LIKE '%caf\\xe9_\\xff.jpg'",
                  "--format", "csv").stdout
    assert out.split() == ['"n"', "1"]


def test_missing_source_is_a_clear_error_before_anything_is_written(tmp_path):
    proc = run_cli("ingest", str(tmp_path / "typo"), str(tmp_path / "ds"), check=False)
    assert proc.returncode == 2 and "source does not exist" in proc.stderr and "typo" in proc.stderr
    assert not (tmp_path / "ds").exists()


def test_mode_conversions_match_reference(corpus):
    root, _, references = corpus
    for name, (mode, pixels) in references.items():
        d = decode(read_file(root / "corpus" / name))
        assert d.mode == mode, name
        got = np.asarray(d.image, dtype=np.int16)
        assert d.image.mode == "RGB" and got.shape == pixels.shape, name
        assert np.abs(got - pixels).max() <= 1, f"{name}: off by {np.abs(got - pixels).max()} levels"


def test_all_eight_exif_orientations(corpus):
    root, _, _ = corpus
    # Only the EXIF tag differs between the files, so the stored pixels are identical:
    # orientation k must give exactly orient(stored, k).
    stored = np.asarray(decode(read_file(root / "corpus" / "orient1.jpg")).image)
    assert np.abs(stored.astype(int) - photo()).mean() < 3  # and that is the picture we wrote
    for k in range(1, 9):
        d = decode(read_file(root / "corpus" / f"orient{k}.jpg"))
        assert np.array_equal(np.asarray(d.image), orient(stored, k)), f"orientation {k}"
        assert (d.width, d.height) == (d.image.width, d.image.height)


def test_draft_decoding_keeps_the_requested_size(corpus):
    root, _, _ = corpus

    data = encode_image(make_image(1600, 1200), "JPEG")
    d = decode(data, min_side=300)
    assert (d.width, d.height) == (1600, 1200)  # the full size is still reported
    assert min(d.image.size) >= 300 and d.image.size == (400, 300)  # 1/4 scale, not 1/8
    assert decode(data).image.size == (1600, 1200)
    # the longer side asked for: 1/8 gives 200x150, whose longer side still reaches 200
    assert decode(data, long_side=200).image.size == (200, 150)
    assert decode(data, min_side=100, long_side=300).image.size == (400, 300)


@pytest.mark.parametrize("size", [(224, 168), (61, 300), (20, 700)])
@pytest.mark.parametrize("fast", [True, False])
def test_resize_is_pillows_bicubic_and_shrink_meets_both_sides(size, fast, monkeypatch):
    """`resize` (torch's uint8 kernel, or Pillow where that is slow) gives Pillow's bicubic
    pixels up to rounding, down or up; `shrink` reduces a full-size decode to the smallest
    size meeting both requests."""
    import curate.images

    if fast and not curate.images.torch_resizes_fast():
        pytest.skip("torch's vectorised uint8 resize needs x86 with AVX2")
    monkeypatch.setattr(curate.images, "torch_resizes_fast", lambda: fast)
    image = make_image(600, 450, seed=5)
    for target in (size, (900, 700)):
        ours = resize(image, target).astype(int)
        pillow = np.asarray(image.resize(target, Image.Resampling.BICUBIC)).astype(int)
        assert ours.shape == pillow.shape and np.abs(ours - pillow).max() <= 1 and (ours != pillow).mean() < 0.01
    decoded = decode(encode_image(image, "PNG"))  # no draft decoding for PNG: full size
    small = shrink(decoded, min_side=100, long_side=120)
    assert small.image.size == (133, 100) and (small.width, small.height) == (600, 450)
    assert np.array_equal(small.pixels(), np.asarray(small.image))  # the array stages read is the image
    assert shrink(decoded, min_side=450, long_side=None) is decoded  # already the size asked for


def outcome(data):
    try:
        d = decode(data)
    except ImageError as e:
        return e.code
    return d.format, d.mode, d.width, d.height, np.asarray(d.image).tobytes()


def test_arrow_buffers_decode_as_bytes_do(corpus):
    """The executor hands the decoder memoryviews of Arrow's buffers (no copy): every file of
    the corpus, good or broken, must come out the same as from Python bytes."""
    root, expected, _ = corpus
    compared = 0
    for name in expected:
        try:
            data = read_file(root / "corpus" / name)
        except ImageError:
            continue  # not a regular file, or over the cap: never stored
        assert outcome(memoryview(pa.py_buffer(data))) == outcome(data), name
        compared += 1
    assert compared >= 30
