"""Aspect buckets: the sets, the choice on hand-made cases, and `curate buckets`."""
from __future__ import annotations

import json

import pytest

from curate.buckets import BucketSetError, choose_bucket, parse_bucket_set, plan_crop, resized_size
from tests.conftest import encode_image, make_image, run_cli

SDXL = parse_bucket_set("sdxl").buckets


@pytest.mark.parametrize("size, bucket", [
    ((3000, 2000), (1216, 832)),  # 3:2 landscape: 1.50 is nearest 1216/832 = 1.46
    ((1000, 3000), (576, 1728)),  # 1:3 portrait, exactly a bucket's ratio
    ((1024, 1024), (1024, 1024)),
    ((8000, 1000), (2048, 512)),  # an extreme panorama goes to the widest bucket
    ((1000, 8000), (512, 2048)),
    ((1100, 1000), (1088, 960)),  # 1.10: nearer 1088/960 = 1.133 than 1024/960 = 1.067 or 1.0
])
def test_sdxl_bucket_choice(size, bucket):
    assert choose_bucket(*size, SDXL) == bucket


def test_smaller_than_every_bucket_has_none_unless_upscaling():
    assert choose_bucket(800, 600, SDXL) is None  # 0.48 MP cannot cover any ~1 MP bucket
    assert choose_bucket(800, 600, SDXL, allow_upscale=True) == (1152, 896)


def test_a_bucket_the_image_cannot_cover_is_never_chosen():
    # 620x400 (1.55) is nearest 640x384 (1.67) but is not 640 wide: it goes to 384x384
    assert choose_bucket(620, 400, [(384, 384), (640, 384)]) == (384, 384)
    assert choose_bucket(620, 400, [(384, 384), (640, 384)], allow_upscale=True) == (640, 384)


def test_a_tie_goes_to_the_larger_then_the_squarer_bucket(tmp_path):
    # 2:1 sits exactly between 1:1 and 4:1 (each crop shortens a side by a factor of 2)
    assert choose_bucket(2048, 1024, [(1024, 256), (512, 512)]) == (512, 512)
    # equal crops, different areas: the larger bucket keeps more pixels
    assert choose_bucket(2048, 1024, [(512, 512), (1024, 256), (768, 768)]) == (768, 768)
    assert choose_bucket(2048, 1024, [(512, 512), (2048, 512)]) == (2048, 512)


def test_sets():
    assert len(SDXL) == 40 and all(w % 64 == 0 and h % 64 == 0 for w, h in SDXL)
    assert (1344, 704) in SDXL and (704, 1344) not in SDXL  # the paper's list is not quite symmetric
    sd15 = parse_bucket_set("sd15").buckets
    assert (512, 512) in sd15 and all(200_000 <= w * h <= 512 * 512 for w, h in sd15)
    rule = parse_bucket_set("rule:step=32,max_area=65536,min_area=50000,max_ratio=2,min_ratio=0.5")
    assert rule.name == "rule:step=32,min_area=50000,max_area=65536,min_ratio=0.5,max_ratio=2"
    assert all(w % 32 == 0 and 50_000 <= w * h <= 65536 and 0.5 <= w / h <= 2 for w, h in rule.buckets)
    assert {(256, 256), (320, 192), (192, 320)} <= set(rule.buckets)


# fpgaminer/bigasp-training encode-vaes-buckets.py (tag bigasp-v2), AR_BUCKETS written out: every
# pair of multiples of 64 with an area in [946176, 1048576] and 1/3 <= w/h <= 3, as (w, h).
BIGASP_V2 = [(576, 1664), (576, 1728), (640, 1536), (640, 1600), (704, 1344), (704, 1408), (704, 1472), (768, 1280),
             (768, 1344), (832, 1152), (832, 1216), (896, 1088), (896, 1152), (960, 1024), (960, 1088),
             (1024, 960), (1024, 1024), (1088, 896), (1088, 960), (1152, 832), (1152, 896), (1216, 832),
             (1280, 768), (1344, 704), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640),
             (1664, 576), (1728, 576)]


def test_bigasp_sets_are_its_code_lists():
    v2 = parse_bucket_set("bigasp-v2")
    assert sorted(v2.buckets) == sorted(BIGASP_V2) and v2.name == "bigasp-v2"
    # the one-bucket-per-side rule with its parameters keeps 23 and misses these (and their transposes)
    rule = set(parse_bucket_set("rule:step=64,min_area=946176,max_area=1048576,min_ratio=0.333,max_ratio=3").buckets)
    missing = {(960, 1024), (896, 1088), (832, 1152), (704, 1344)}
    assert len(rule) == 23 and not (missing | {(h, w) for w, h in missing}) & rule
    assert missing | {(h, w) for w, h in missing} <= set(v2.buckets)
    v1 = parse_bucket_set("bigasp-v1").buckets  # v1's code: the same band, w/h from 0.5 (its post: the SDXL list)
    assert sorted(v1) == sorted(b for b in BIGASP_V2 if b[0] / b[1] >= 0.5) and len(v1) == 26


def test_custom_file_and_bad_sets(tmp_path):
    path = tmp_path / "buckets.txt"
    path.write_text("# mine\n640x384\n384x640  # portrait\n512x512\n")
    assert parse_bucket_set(str(path)).buckets == ((640, 384), (384, 640), (512, 512))
    (tmp_path / "bad.txt").write_text("640 by 384\n")
    for spec, says in [("sdxxl", "sdxl, sd15"), ("rule:stride=64", "known keys"),
                       (str(tmp_path / "bad.txt"), "WIDTHxHEIGHT"),
                       ("rule:max_area=100", "no buckets")]:
        with pytest.raises(BucketSetError, match=says):
            parse_bucket_set(spec)


def test_crop_geometry_puts_height_and_width_in_their_places():
    crop = plan_crop(3000, 2000, (1216, 832), "center", seed=0)
    assert (crop.resized_width, crop.resized_height) == resized_size(3000, 2000, (1216, 832)) == (1248, 832)
    assert (crop.crop_left, crop.crop_top, crop.target_width, crop.target_height) == (16, 0, 1216, 832)
    tall = plan_crop(1000, 3000, (576, 1728), "random", seed=1)
    assert (tall.resized_width, tall.resized_height) == (576, 1728) and tall.crop_left == tall.crop_top == 0
    crops = {plan_crop(2000, 3000, (832, 1216), "random", seed=s).crop_top for s in range(20)}
    assert len(crops) > 5 and max(crops) <= 1248 - 1216


def test_buckets_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, (w, h) in {"land": (400, 300), "tall": (200, 640), "tiny": (100, 90)}.items():
        (src / f"{name}.png").write_bytes(encode_image(make_image(w, h), "PNG"))
    ds = tmp_path / "ds"
    run_cli("ingest", str(src), str(ds), "-q")
    bad = run_cli("buckets", str(ds), "--set", "sdlx", check=False)
    assert bad.returncode == 2 and "unknown bucket set 'sdlx'" in bad.stderr and "sd15" in bad.stderr
    spec = "rule:step=64,max_area=65536,min_area=40000"
    run_cli("buckets", str(ds), "--set", spec, "-q")
    run_cli("buckets", str(ds), "--set", spec, "--allow-upscale", "--where", "width < 150", "-q")
    rows = run_cli("sql", str(ds), "SELECT regexp_extract(source, '(\\w+).png', 1) AS name, model, b.status, b.error, "
                   "bucket_width, bucket_height, b.message FROM buckets b JOIN images USING (image_id) "
                   "ORDER BY name, model",
                   "--format", "json").stdout
    got = {(r["name"], r["model"].endswith("+upscale")): r for r in map(json.loads, rows.splitlines())}
    assert (got["land", False]["bucket_width"], got["land", False]["bucket_height"]) == (320, 192)
    assert (got["tall", False]["bucket_width"], got["tall", False]["bucket_height"]) == (128, 384)
    assert got["tiny", False]["error"] == "too_small" and "100x90 covers no bucket" in got["tiny", False]["message"]
    assert got["tiny", True]["status"] == "ok" and got["tiny", True]["bucket_width"] == 256
    assert ("land", True) not in got  # --where chose only the tiny image
