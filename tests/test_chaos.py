"""Chaos: while a command runs over a few hundred images, a driver kills (-9) its pass process,
the command itself and a second invocation running at the same time, at random moments, for
several rounds. Afterwards the tables equal those of a run that was never disturbed: nothing
lost, nothing done twice. For `curate hash` and for `curate ingest`."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, encode_image, make_image, run_cli

from curate import store
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.store import Dataset

# Each image's read waits 30 ms: a run lasts seconds on any machine, so every round's kills land mid-work.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CURATE_PART_ROWS": "16", "CURATE_TEST_DECODE_DELAY": "0.03"}
ROUNDS = 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("chaos") / "src"
    for i in range(300):
        folder = src / f"d{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"c{i:03d}.jpg").write_bytes(encode_image(make_image(256 + i % 50, 192, seed=i), quality=90))
    for i in range(0, 300, 40):  # exact duplicates and broken files among them
        shutil.copy(src / f"d{i % 4}" / f"c{i:03d}.jpg", src / f"dup{i:03d}.jpg")
        (src / f"broken{i:03d}.jpg").write_bytes(b"not a picture")
    return src


def curate(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "curate", *args, "-q"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pass_process(proc: subprocess.Popen) -> int | None:
    """The command's pass process (the local engine's child), if it runs now."""
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if children else None


def chaos(args: list[str], rng: random.Random) -> int:
    """Rounds of the command, with a second invocation beside it half the time. In each, at
    random moments, a pass process is killed (its command starts another), then the command
    and the second one: what is left carries over to the next round. Returns the kills that
    hit a running process."""
    kills = 0

    def hit(pid: int | None) -> None:
        nonlocal kills
        if pid is not None and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            kill(pid)
            kills += 1

    for _ in range(ROUNDS):
        first = curate(*args)
        second = curate(*args) if rng.random() < 0.5 else None
        deadline = time.monotonic() + 60
        while pass_process(first) is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # started: imports done, the pass is on
        time.sleep(rng.uniform(0.0, 0.3))
        hit(pass_process(rng.choice([p for p in (first, second) if p is not None])))
        time.sleep(rng.uniform(0.05, 0.3))
        hit(first.pid)
        if second is not None:
            time.sleep(rng.uniform(0.0, 0.3))
            hit(second.pid)
        for proc in (first, second):
            if proc is not None:
                proc.wait(timeout=60)
    return kills


def table(ds_dir, name: str, key: str) -> list[dict]:
    return Dataset(ds_dir).read(name).drop_columns(["created_at"]).sort_by(key).to_pylist()


def test_chaos_hash_ends_with_the_undisturbed_tables(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "PART_ROWS", 16)
    base = Dataset(tmp_path / "base", create=True)
    ingest([str(sources)], base, show_progress=False)
    base = base.root
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    run(Dataset(reference), StatsStage(), show_progress=False)
    assert chaos(["hash", str(base)], random.Random(16)) >= ROUNDS
    run_cli("hash", str(base), "-q")
    got = table(base, "stats", "image_id")
    assert [r["image_id"] for r in got] == sorted({r["image_id"] for r in got})  # nothing twice
    assert got == table(reference, "stats", "image_id")  # nothing lost, nothing different


def test_chaos_ingest_ends_with_the_undisturbed_table(sources, tmp_path):
    reference = tmp_path / "reference"
    ingest([str(sources)], Dataset(reference, create=True), show_progress=False)
    ds_dir = tmp_path / "ds"
    assert chaos(["ingest", str(sources), str(ds_dir)], random.Random(17)) >= ROUNDS
    run_cli("ingest", str(sources), str(ds_dir), "-q")
    got, want = table(ds_dir, "images", "source"), table(reference, "images", "source")
    assert [r["source"] for r in got] == [r["source"] for r in want]  # every file once
    # Which copy of an exact duplicate stores the bytes may differ (runs in parallel); every
    # image's first row has them, and every other column is the same.
    assert [{**r, "bytes": None} for r in got] == [{**r, "bytes": None} for r in want]
    stored = {r["image_id"]: r["bytes"] for r in want if r["bytes"] is not None}
    first: dict = {}
    for r in Dataset(ds_dir).read("images").to_pylist():  # in part order
        first.setdefault(r["image_id"], r)
    assert {i: r["bytes"] for i, r in first.items() if r["status"] == "ok"} == stored
    assert not list(ds_dir.glob("tables/*/.tmp-*"))
