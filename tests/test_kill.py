"""kill -9 at random points, then the same command again: the tables equal those of a
run that never stopped, and no reader ever sees a partial part."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, encode_image, make_image

from curate.store import Dataset

ENV = {**os.environ, "PYTHONPATH": str(REPO), "CURATE_PART_ROWS": "8"}  # a part every 8 rows


def curate(*args):
    return [sys.executable, "-m", "curate", *args, "-q"]


def table(ds_dir: Path, name: str, key: str) -> list[dict]:
    return Dataset(ds_dir).read(name).drop_columns(["created_at"]).sort_by(key).to_pylist()


def check_visible_parts(ds_dir: Path) -> int:
    """Every part a reader can see is complete; returns how many there are."""
    parts = list(ds_dir.glob("tables/*/part-*.parquet"))
    for part in parts:
        pq.read_table(part)  # raises on a half-written part
    return len(parts)


def run_and_kill(args, ds_dir: Path, after_parts: int, delay: float) -> bool:
    """Start `curate ARGS`, SIGKILL it `delay` s after `after_parts` parts appeared. Returns
    whether it was killed (False: it finished first)."""
    proc = subprocess.Popen(curate(*args), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while check_visible_parts(ds_dir) < after_parts and proc.poll() is None:
            assert time.monotonic() < deadline, "hung"
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("kill") / "src"
    for i in range(64):
        folder = src / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        fmt, ext = ("PNG", "png") if i % 4 == 0 else ("JPEG", "jpg")
        (folder / f"img{i:03d}.{ext}").write_bytes(encode_image(make_image(160 + i, 120 + i % 7, seed=i), fmt))
    for i in range(0, 64, 16):  # exact duplicates and broken files across the run
        shutil.copy(next(src.glob(f"d*/img{i:03d}.*")), src / f"dup{i:03d}.jpg")
        (src / f"broken{i:03d}.jpg").write_bytes(b"nope" * i)
    return src


def test_kill_ingest_then_resume(images, tmp_path):
    subprocess.run(curate("ingest", str(images), str(tmp_path / "ref")), env=ENV, cwd=REPO, check=True, timeout=120)
    reference = table(tmp_path / "ref", "images", "source")
    assert len(reference) == 64 + 8
    rng = random.Random(2)
    killed = 0
    for trial, after_parts in enumerate([0, 2, 5]):
        ds_dir = tmp_path / f"ds{trial}"
        killed += run_and_kill(["ingest", str(images), str(ds_dir)], ds_dir, after_parts, rng.uniform(0, 0.08))
        check_visible_parts(ds_dir)
        subprocess.run(curate("ingest", str(images), str(ds_dir)), env=ENV, cwd=REPO, check=True, timeout=120)
        got = table(ds_dir, "images", "source")
        assert got == reference, f"trial {trial}"
        stored = [r["image_id"] for r in got if r["bytes"] is not None]
        assert len(stored) == len(set(stored)) == len({r["image_id"] for r in got if r["status"] == "ok"})
        assert not list(ds_dir.glob("tables/*/.tmp-*")), "the rerun cleans up what the kill left"
    assert killed >= 2, "the kills must land while the command runs"


def test_kill_hash_then_resume(images, tmp_path):
    base = tmp_path / "base"
    subprocess.run(curate("ingest", str(images), str(base)), env=ENV, cwd=REPO, check=True, timeout=120)
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    subprocess.run(curate("hash", str(ref)), env=ENV, cwd=REPO, check=True, timeout=120)
    reference = table(ref, "stats", "image_id")
    assert len(reference) == len(Dataset(base).select_ids())
    rng = random.Random(3)
    killed = 0
    parts_before = check_visible_parts(base)
    for trial, after_parts in enumerate([0, 1, 2]):  # hashing 72 small images takes well under a second:
        ds_dir = tmp_path / f"ds{trial}"  # kill early enough to land while it runs
        shutil.copytree(base, ds_dir)
        killed += run_and_kill(["hash", str(ds_dir)], ds_dir, parts_before + after_parts, rng.uniform(0, 0.01))
        subprocess.run(curate("hash", str(ds_dir)), env=ENV, cwd=REPO, check=True, timeout=120)
        got = table(ds_dir, "stats", "image_id")
        assert got == reference, f"trial {trial}"
        assert len({r["image_id"] for r in got}) == len(got)
    assert killed >= 2, "the kills must land while the command runs"
