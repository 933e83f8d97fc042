"""`curate dups` (exact and near duplicate groups) and `curate info`."""
import json
import random

from conftest import encode_image, make_image, run_cli

from curate.pipelines.dups import _bands, duplicate_groups
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.store import Dataset, now


def test_bands_cover_all_bits():
    for t in range(0, 17):
        bands = _bands(t)
        assert len(bands) == t + 1 and bands[0][0] == 0 and bands[-1][1] == 64
        assert all(lo < hi for lo, hi in bands) and all(a[1] == b[0] for a, b in zip(bands, bands[1:]))


def test_dups_exact_and_near(image_dir, tmp_path):
    original = make_image(400, 300, seed=42)
    (image_dir / "photo.jpg").write_bytes(encode_image(original, quality=95))
    (image_dir / "photo_small.jpg").write_bytes(encode_image(original.resize((200, 150)), quality=60))
    (image_dir / "photo_again.png").write_bytes(encode_image(original, "PNG"))
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(image_dir)], ds, show_progress=False)
    assert {r["kind"] for r in duplicate_groups(ds).to_pylist()} == {"exact"}  # near ones need hashes
    run(ds, StatsStage(), show_progress=False)[0]

    rows = [json.loads(x) for x in run_cli("dups", str(ds.root), "--format", "json").stdout.splitlines()]
    exact = [r for r in rows if r["kind"] == "exact"]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in exact) == ["copy_of_img01.jpg", "img01.jpg"]
    near = [r for r in rows if r["kind"] == "near"]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in near) == ["photo.jpg", "photo_again.png", "photo_small.jpg"]
    assert len({r["group"] for r in near}) == 1 and all(r["distance"] <= 6 for r in near)

    table = run_cli("dups", str(ds.root)).stdout  # the default: a table
    assert "exact" in table and "near" in table and "photo_small.jpg" in table
    proc = run_cli("dups", str(ds.root), "--threshold", "40", check=False)
    assert proc.returncode == 2 and "between 0 and 16" in proc.stderr


def test_near_groups_match_brute_force(dataset):
    """The banded search finds exactly the images an all-pairs comparison finds, on
    hashes made to sit at every distance from 0 to 20 bits of each other."""
    rng = random.Random(5)
    ids = dataset.select_ids()
    base = rng.getrandbits(64)
    phashes = [base]
    for _ in ids[1:]:  # each a few bits away from a random earlier one: chains and stars
        flips = rng.sample(range(64), rng.randint(0, 20))
        phashes.append(rng.choice(phashes) ^ sum(1 << b for b in flips))
    dataset.write_part("stats", {
        "image_id": ids, "model": ["made-up"] * len(ids), "status": ["ok"] * len(ids), "error": [None] * len(ids),
        "message": [None] * len(ids), "created_at": [now()] * len(ids), "phash": phashes,
        "brightness": [0.5] * len(ids), "sharpness": [1.0] * len(ids), "colorfulness": [1.0] * len(ids),
        "entropy": [1.0] * len(ids)})
    for t in range(0, 17, 2):
        brute = {i for i, a in zip(ids, phashes) for j, b in zip(ids, phashes) if i != j and (a ^ b).bit_count() <= t}
        near = [r for r in duplicate_groups(dataset, t).to_pylist() if r["kind"] == "near"]
        assert {r["image_id"] for r in near} == brute, f"threshold {t}"
    assert brute  # the hashes did make near pairs


def test_info(dataset):
    run(dataset, StatsStage(), show_progress=False)[0]
    rows = {r["table"]: r
            for r in map(json.loads, run_cli("info", str(dataset.root), "--format", "json").stdout.splitlines())}
    assert rows["images"]["rows"] == 14 and rows["images"]["ok"] == 13
    assert rows["images"]["errors"] == "unidentified: 1"
    assert rows["stats"]["model"] == "stats-v1" and rows["stats"]["rows"] == 12
    out = run_cli("info", str(dataset.root))
    assert "stats-v1" in out.stdout and "exact_duplicates" in out.stdout
