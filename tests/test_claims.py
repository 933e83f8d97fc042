"""Two runs of a stage on one dataset never do an image twice: work is claimed (leases with an
owner and a heartbeat, taken over when the owner is gone), the second run shares what is left
or says who holds it, and a killed run's leases never block the next."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, encode_image, make_image, run_cli

from curate.claims import Claims, Owner, this_machine
from curate.store import Dataset

ENV = {"CURATE_PART_ROWS": "8"}  # a part (a unit of work) every 8 rows


@pytest.fixture
def many(tmp_path):
    """A dataset of 48 images in 6 parts, and its source folder (with 4 exact duplicates)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(48):
        (src / f"i{i:02d}.jpg").write_bytes(encode_image(make_image(64 + i, 48, seed=i)))
    for i in range(4):
        (src / f"z_copy{i}.jpg").write_bytes((src / f"i{i:02d}.jpg").read_bytes())
    run_cli("ingest", str(src), str(tmp_path / "ds"), "-q", env=ENV)
    return Dataset(tmp_path / "ds"), src


def fake_owner(root, owner_id: str, machine: str, pid: int, age: float = 0.0) -> str:
    """The record of another run, as that run would have written it."""
    folder = root / "claims" / "owners" / owner_id
    folder.mkdir(parents=True)
    record = folder / "owner"
    record.write_text(json.dumps({"host": "elsewhere", "machine": machine, "pid": pid, "command": "curate hash DS",
                                  "started": "earlier"}))
    if age:
        os.utime(record, (time.time() - age, time.time() - age))
    return owner_id


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def summary_value(stdout: str, name: str) -> str | None:
    match = re.search(rf"│ {re.escape(name)}\s*│ ([^│]*?)\s*│", stdout)
    return match and match.group(1)


def test_leases_are_held_taken_over_and_released(tmp_path):
    ds = Dataset(tmp_path / "ds", create=True)
    with ds.owner() as a, ds.owner() as b:
        mine, theirs = ds.claims("stats", "m", a), ds.claims("stats", "m", b)
        assert mine.claim("u1") is None and mine.claim("u1") is None  # new, then already held
        assert f"pid {os.getpid()} (" in theirs.claim("u1")  # a live run holds it
        # a run on this machine whose process is gone: taken over at once, by the next generation
        gone = fake_owner(ds.root, "gone", this_machine(), dead_pid())
        assert Claims(str(ds.root), "stats", "m", gone).claim("u2") is None
        assert theirs.claim("u2") is None and mine.claim("u2") == mine.holder("u2") is not None
        assert sorted(p.name for p in theirs.folder.glob("u2.*")) == ["u2.0", "u2.1"]
        # a run on another machine: alive while it touches its record, gone once it stops for STALE seconds
        fresh = fake_owner(ds.root, "fresh", "another-machine", 1)
        stale = fake_owner(ds.root, "stale", "another-machine", 1, age=600)
        assert Claims(str(ds.root), "stats", "m", fresh).claim("u3") is None
        assert Claims(str(ds.root), "stats", "m", stale).claim("u4") is None
        assert "elsewhere pid 1 (curate hash DS" in mine.claim("u3")
        assert mine.claim("u4") is None
        assert isinstance(a, Owner) and (a.folder / "owner").exists()
    # both runs ended: their leases and records are gone, the others' are left as they were
    assert not (ds.root / "claims" / "owners" / a.id).exists() and not (ds.root / "claims" / "owners" / b.id).exists()
    assert sorted(p.name for p in mine.folder.glob("u*")) == ["u2.0", "u3.0", "u4.0"]


def test_a_second_run_says_who_holds_the_rest_and_a_dead_holder_never_blocks(many):
    ds, _ = many
    parts = ds.parts("images")
    assert len(parts) >= 6
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = fake_owner(ds.root, "other-run", this_machine(), holder.pid)
        for part in parts[:2]:  # another run is busy with the first two parts
            assert Claims(str(ds.root), "stats", "stats-v1", other).claim(part.stem) is None
        proc = run_cli("hash", str(ds.root), env={**ENV, "COLUMNS": "300"})
        left = summary_value(proc.stdout, f"left to the run that holds them: elsewhere pid {holder.pid} "
                                          "(curate hash DS, since earlier)")
        assert left is not None and int(left) > 0, proc.stdout
        stats = ds.read("stats").column("image_id").to_pylist()
        assert len(stats) == len(set(stats)) == len(ds.select_ids()) - int(left)
    finally:
        holder.kill()
        holder.wait()
    run_cli("hash", str(ds.root), "-q", env=ENV)  # the holder is gone: its leases are taken over
    stats = ds.read("stats").column("image_id").to_pylist()
    assert len(stats) == len(set(stats)) == len(ds.select_ids())


def curate_proc(*args, env_extra):
    return subprocess.Popen([sys.executable, "-m", "curate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **ENV, **env_extra})


def test_two_machines_hash_one_dataset_at_once(many):
    """Two runs that cannot see each other's processes (two machines: only heartbeats tell)."""
    ds, _ = many
    runs = [curate_proc("hash", str(ds.root), env_extra={"CURATE_MACHINE": m, "COLUMNS": "200"}) for m in "ab"]
    outputs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    oks = [int(summary_value(out, "ok") or 0) for out, _ in outputs]
    stats = ds.read("stats").column("image_id").to_pylist()
    assert len(stats) == len(set(stats)) == len(ds.select_ids()) == sum(oks)  # every image once, by one of them


def test_two_ingests_of_the_same_sources_store_each_file_once(many, tmp_path):
    _, src = many
    target = tmp_path / "twice"
    runs = [curate_proc("ingest", str(src), str(target), "-q", env_extra={}) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    rows = Dataset(target).read("images").to_pylist()
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) == 52
    first: dict = {}
    for r in rows:  # parts in order: an image's first row holds its bytes
        first.setdefault(r["image_id"], r)
    assert all(r["bytes"] is not None for r in first.values()) and len(first) == 48
    groups = run_cli("dups", str(target), "--format", "json").stdout.splitlines()
    assert len(groups) == 8  # the 4 exact duplicate pairs; no file is a duplicate of its own path
