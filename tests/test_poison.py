"""A file that kills the process decoding it, for real (a segfault or abort in C, a SIGKILL as
from the OOM killer; curate.images' test hook), costs that file one `worker_died` row that
names it; the same invocation finishes everything else, on both engines, and a rerun does
not try it again."""
import ctypes
import os
import shutil
import sys

import pytest
from conftest import encode_image, make_image, run_cli

from curate.images import CRASH_MARKER
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.store import Dataset


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """30 images, one of them (p13.jpg) poison: a valid JPEG whose last bytes are the marker."""
    src = tmp_path_factory.mktemp("poison") / "src"
    src.mkdir()
    for i in range(30):
        data = encode_image(make_image(90 + i, 70, seed=i))
        (src / f"p{i:02d}.jpg").write_bytes(data + (CRASH_MARKER if i == 13 else b""))
    return src


def rows(ds_dir, table: str, key: str) -> dict:
    return {r[key]: r for r in Dataset(ds_dir).read(table).drop_columns(["created_at"]).to_pylist()}


def test_ingest_survives_a_decoder_segfault(sources, tmp_path):
    poison = str(sources / "p13.jpg")
    proc = run_cli("ingest", str(sources), str(tmp_path / "ds"), "-q", env={"CURATE_TEST_CRASH": "segv"})
    assert "SIGSEGV" in proc.stderr and poison in proc.stderr and "Traceback" not in proc.stderr
    got = rows(tmp_path / "ds", "images", "source")
    assert len(got) == 30 and got[poison]["error"] == "worker_died" and got[poison]["bytes"] is None
    assert "SIGSEGV" in got[poison]["message"]
    assert sum(r["status"] == "ok" for r in got.values()) == 29
    run_cli("ingest", str(sources), str(tmp_path / "ds"), "-q", env={"CURATE_TEST_CRASH": "segv"})
    assert rows(tmp_path / "ds", "images", "source") == got  # the rerun neither retries it nor adds a row


@pytest.mark.parametrize("how", ["abort", "kill"])
def test_hash_survives_an_abort_or_an_oom_kill(sources, tmp_path, how):
    """The poison image is in the dataset (ingested without the hook); `curate hash` crashes on it."""
    ds_dir = tmp_path / "ds"
    run_cli("ingest", str(sources), str(ds_dir), "-q")
    reference = tmp_path / "ref"
    shutil.copytree(ds_dir, reference)
    run_cli("hash", str(reference), "-q")
    proc = run_cli("hash", str(ds_dir), "-q", env={"CURATE_TEST_CRASH": how})
    poison = str(sources / "p13.jpg")
    assert poison in proc.stderr and "worker_died" in proc.stderr and "Traceback" not in proc.stderr
    got, want = rows(ds_dir, "stats", "image_id"), rows(reference, "stats", "image_id")
    (poison_id,) = [i for i, r in got.items() if r["status"] != "ok"]
    assert got[poison_id]["error"] == "worker_died" and poison in got[poison_id]["message"]
    assert {i: r for i, r in got.items() if i != poison_id} == {i: r for i, r in want.items() if i != poison_id}


class CrashingModel(StatsStage):
    """A stage whose model crashes natively on one image's batch, as a GPU kernel fault would."""

    batch_size = 8

    def __init__(self, poison: str):
        self.poison = poison

    def model_key(self):
        return "crashing-model"

    def setup(self):  # a stage with a model: its batches go to model workers
        pass

    def process(self, batch):
        if self.poison in batch["image_id"]:
            ctypes.string_at(0)
        return super().process(batch)


def test_a_model_that_crashes_on_one_image(sources, tmp_path):
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(sources)], ds, show_progress=False)
    poison = sorted(ds.select_ids())[5]
    summary = run(ds, CrashingModel(poison), show_progress=False)[0]
    assert summary.ok == 29 and summary.errors == {"worker_died": 1}
    got = {r["image_id"]: r for r in ds.read("stats").to_pylist()}
    assert got[poison]["error"] == "worker_died" and "alone, twice" in got[poison]["message"]


def test_ray_engine_survives_decoder_and_model_actor_crashes(sources, tmp_path, ray_cluster):
    """A segfault while decoding (ingest) and in a model actor (a stage): the block goes on
    without it at full speed, and the rows it held are retried alone until one is pinned."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    assert os.environ.get("CURATE_TEST_CRASH") is None  # the cluster's workers have it; this process not
    ds = Dataset(tmp_path / "ds", create=True)
    summary = ingest([str(sources)], ds, show_progress=False, engine="ray")
    assert summary.ok == 29 and summary.errors == {"worker_died": 1}
    poison = str(sources / "p13.jpg")
    assert rows(ds.root, "images", "source")[poison]["error"] == "worker_died"
    target = sorted(ds.select_ids())[3]
    summary = run(ds, CrashingModel(target), engine="ray", show_progress=False)[0]
    assert summary.ok == 28 and summary.errors == {"worker_died": 1}
    assert rows(ds.root, "stats", "image_id")[target]["error"] == "worker_died"
