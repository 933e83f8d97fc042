"""Both engines write the same tables, on a real local Ray cluster (num_cpus=2)."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading

from conftest import REPO, encode_image, make_image, run_cli
from hostile import build_corpus

from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.store import Dataset


def rows(ds: Dataset, table: str, key: str) -> list[dict]:
    t = ds.read(table)
    return t.drop_columns(["created_at"]).sort_by(key).to_pylist()


def test_engines_write_the_same_tables(tmp_path, image_dir, ray_cluster):
    build_corpus(image_dir / "hostile")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # a webdataset-style shard
        for i in range(6):
            for name, data in [(f"{i:06d}.jpg", encode_image(make_image(64, 48, seed=100 + i))),
                               (f"{i:06d}.txt", b"a caption")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sources = [str(image_dir), str(tmp_path / "shard-000.tar"), str(image_dir / "img00.png")]
    local, ray = Dataset(tmp_path / "local", create=True), Dataset(tmp_path / "ray", create=True)
    counts_local = ingest(sources, local, show_progress=False)
    counts_ray = ingest(sources, ray, show_progress=False, engine="ray")
    assert ((counts_local.ok, counts_local.errors, counts_local.counts)
            == (counts_ray.ok, counts_ray.errors, counts_ray.counts))
    assert rows(local, "images", "source") == rows(ray, "images", "source")
    assert counts_local.ok > 30 and counts_local.counts["duplicate"] >= 3  # the hostile copies of one JPEG

    summary_local = run(local, StatsStage(), show_progress=False)[0]
    summary_ray = run(ray, StatsStage(), engine="ray", show_progress=False)[0]
    assert summary_local.ok == summary_ray.ok > 30
    assert summary_local.errors == summary_ray.errors
    assert rows(local, "stats", "image_id") == rows(ray, "stats", "image_id")

    # Ingesting again on Ray adds nothing, tar members included.
    again = ingest(sources, ray, show_progress=False, engine="ray")
    assert again.done == 0 and not again.counts


HEAD = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin; then ray shuts the cluster down
"""


def test_join_an_existing_cluster(dataset, tmp_path):
    """--ray-address joins a cluster someone else started (here: another process's)."""
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        address = head.stdout.readline().strip()
        assert ":" in address
        out = run_cli("hash", str(dataset.root), "--engine", "ray", "--ray-address", address, timeout=300)
        assert dataset.read("stats").num_rows == 12
        assert "INFO" not in out.stderr and "Started a local Ray instance" not in out.stderr
    finally:
        head.stdin.close()
        head.wait(timeout=60)


class PoisonStage(StatsStage):
    """Kills the worker process that prepares one image, as a decoder crash would."""

    def __init__(self, poison: str):
        self.poison = poison

    def model_key(self):
        return "poison"

    def prepare(self, row):
        if row["image_id"] == self.poison:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().prepare(row)


def test_poison_image_is_recorded_as_worker_died(dataset, ray_cluster):
    """Ray Data by default retries a task whose worker died forever (a hang); ours gives
    up after two retries and isolates the image that kills its worker."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    poison = dataset.select_ids()[3]
    outcome = {}

    def go():
        try:
            outcome["summary"] = run(dataset, PoisonStage(poison), engine="ray", show_progress=False)[0]
        except Exception as e:
            outcome["error"] = e

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive(), "the run hung on a worker that keeps dying"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.ok == 11 and summary.errors == {"worker_died": 1}
    rows = {r["image_id"]: r for r in dataset.read("stats").to_pylist()}
    assert len(rows) == 12 and rows[poison]["error"] == "worker_died"


class SlowModel(StatsStage):
    """A stage with a model (so a Ray actor holds it) that takes its time, decoding too,
    so kills land mid-run."""

    batch_size = 4

    def model_key(self):
        return "slow-model"

    def setup(self):
        pass

    def prepare(self, row):
        import time

        time.sleep(0.1)
        return super().prepare(row)

    def process(self, batch):
        import time

        time.sleep(0.4)
        return super().process(batch)


def ray_processes(kind: str) -> list:
    """This machine's Ray worker processes running `kind` (a task's or an actor's name)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::") and kind in title:
            found.append(proc)
    return found


def test_killed_ray_workers_and_model_actor_leave_the_same_tables(tmp_path, ray_cluster):
    import time

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"i{i:02d}.jpg").write_bytes(encode_image(make_image(80 + i, 60, seed=i)))
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(src)], ds, show_progress=False)
    reference = run(ds, SlowModel(), show_progress=False)[0]
    expected = rows(ds, "stats", "image_id")
    for part in ds.parts("stats"):
        part.unlink()
    kills = []

    def killer():
        # A decoder first, at once (its tasks are short), then the model actor once it holds a batch.
        for kind, wait in (("_prepare_batch", 0), ("MapWorker", 0.3), ("_prepare_batch", 0)):
            deadline = time.monotonic() + 60
            while not ray_processes(kind) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(wait)
            for proc in ray_processes(kind)[:1]:
                proc.kill()
                kills.append(kind)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run(ds, SlowModel(), engine="ray", show_progress=False)[0]
    thread.join(timeout=60)
    assert "MapWorker" in kills and "_prepare_batch" in kills
    assert summary.ok == reference.ok == 40 and not summary.errors
    assert rows(ds, "stats", "image_id") == expected
