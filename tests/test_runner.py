import numpy as np

from curate.pipelines.executor import run
from curate.pipelines.stage import Stage
from curate.pipelines.stats import StatsStage

COLUMNS = ["image_id", "model", "status", "error", "phash", "brightness", "sharpness", "colorfulness", "entropy"]


def table(ds):
    return ds.read("stats").select(COLUMNS).sort_by("image_id")


def test_stats_resume_does_nothing_twice(dataset):
    first = run(dataset, StatsStage(), show_progress=False)[0]
    assert first.ok == 12 and not first.errors
    again = run(dataset, StatsStage(), show_progress=False)[0]
    assert again.todo == 0
    assert table(dataset).num_rows == 12


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
    summary = run(dataset, FragileStage(ids[0], ids[1]), show_progress=False)[0]
    assert summary.ok == len(ids) - 2
    assert summary.errors == {"prepare_failed": 1, "process_failed": 1}
    rows = {r["image_id"]: r for r in dataset.read("stats").to_pylist()}
    assert rows[ids[0]]["error"] == "prepare_failed" and "cannot prepare" in rows[ids[0]]["message"]
    assert rows[ids[1]]["error"] == "process_failed" and rows[ids[2]]["status"] == "ok"


class KeyedStage(Stage):
    """Records every batch it sees; the key is the image's width modulo 3."""

    table = "stats"
    columns = ("image_id", "bytes", "width")
    batch_size = 2

    def __init__(self):
        self.batches = []

    def model_key(self):
        return "keyed"

    def prepare(self, row):
        return {"key": row["width"] % 3}

    def batch_key(self, prepared):
        return prepared["key"]

    def process(self, batch):
        self.batches.append(list(batch["key"]))
        return {"brightness": [0.5] * len(batch["key"])}


def test_local_engine_fills_batches_of_one_key(dataset):
    stage = KeyedStage()
    summary = run(dataset, stage, show_progress=False)[0]
    assert summary.ok == 12
    assert all(len(set(keys)) == 1 for keys in stage.batches)
    # batches are filled across input batches: at most one partial batch per key
    partial = [keys[0] for keys in stage.batches if len(keys) < stage.batch_size]
    assert len(partial) == len(set(partial)) <= 3
