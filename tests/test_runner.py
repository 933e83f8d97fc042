import numpy as np
import pyarrow as pa

from pipelines.runner import run_stage
from pipelines.stage import Stage
from pipelines.stats import StatsStage

COLUMNS = ["image_id", "model", "status", "error", "phash", "brightness", "sharpness", "colorfulness", "entropy"]


def table(ds):
    return ds.read("stats").select(COLUMNS).sort_by("image_id")


def test_stats_resume_does_nothing_twice(dataset):
    first = run_stage(dataset, StatsStage(), show_progress=False)
    assert first.ok == 12 and not first.errors
    again = run_stage(dataset, StatsStage(), show_progress=False)
    assert again.todo == 0
    assert table(dataset).num_rows == 12


def test_engines_write_the_same_rows(dataset, ray_cluster, tmp_path):
    run_stage(dataset, StatsStage(), show_progress=False)
    local = table(dataset)
    for part in dataset.parts("stats"):
        part.unlink()
    summary = run_stage(dataset, StatsStage(), engine="ray", show_progress=False)
    assert summary.ok == 12
    assert table(dataset).equals(local)


class FragileStage(Stage):
    """Fails on one image in prepare and on another in process; the rest must still land."""

    table = "stats"
    decode_min_side = 32
    batch_size = 5

    def __init__(self, bad_prepare, bad_process):
        self.bad_prepare, self.bad_process = bad_prepare, bad_process

    def model_key(self):
        return "fragile"

    def prepare(self, row):
        if row["image_id"] == self.bad_prepare:
            raise ValueError("cannot prepare")
        return {"pixels": np.asarray(row["image"].image.resize((8, 8)), dtype=np.float32)}

    def process(self, batch):
        if self.bad_process in batch["image_id"]:
            raise RuntimeError("model exploded")
        return {"brightness": list(batch["pixels"].mean(axis=(1, 2, 3)) / 255)}


def test_one_bad_image_fails_alone(dataset):
    ids = dataset.select_ids()
    summary = run_stage(dataset, FragileStage(ids[0], ids[1]), show_progress=False)
    assert summary.ok == len(ids) - 2
    assert summary.errors == {"prepare_failed": 1, "process_failed": 1}
    rows = {r["image_id"]: r for r in dataset.read("stats").to_pylist()}
    assert rows[ids[0]]["error"] == "prepare_failed" and "cannot prepare" in rows[ids[0]]["message"]
    assert rows[ids[1]]["error"] == "process_failed" and rows[ids[2]]["status"] == "ok"
