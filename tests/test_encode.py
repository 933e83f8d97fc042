"""Latents: `curate encode`, and the runner's batches of one key that it relies on."""
from __future__ import annotations

from pipelines.runner import run_stage
from pipelines.stage import Stage


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
    summary = run_stage(dataset, stage, show_progress=False)
    assert summary.ok == 12
    assert all(len(set(keys)) == 1 for keys in stage.batches)
    # batches are filled across input batches: at most one partial batch per key
    partial = [keys[0] for keys in stage.batches if len(keys) < stage.batch_size]
    assert len(partial) == len(set(partial)) <= 3
