"""A pass of several stages: one read and one decode per image, one table per stage, resume per stage."""
import multiprocessing
import os
import sys

import numpy as np
import pytest

import curate.pipelines.rows as pass_rows
from curate.pipelines.executor import run
from curate.pipelines.stage import Stage
from curate.pipelines.stats import StatsStage


class MeanColour(Stage):
    """A stand-in embedder: the image's mean colour at 96 px, as a 3-d 'embedding'."""

    table = "embeddings"
    decode_min_side = 96
    batch_size = 4

    def model_key(self):
        return "mean-colour"

    def prepare(self, row):
        assert min(row["image"].image.size) >= 96
        return {"pixels": np.asarray(row["image"].image.resize((96, 96)), dtype=np.float32)}

    def process(self, batch):
        return {"embedding": list((batch["pixels"].mean(axis=(1, 2)) / 255).astype(np.float16))}


@pytest.fixture
def count_decodes(monkeypatch):
    calls = multiprocessing.Manager().list()  # the local engine decodes in a process of its own

    def counting(data, min_side=None, **kw):
        calls.append(min_side)
        return real(data, min_side, **kw)

    real = pass_rows.decode
    monkeypatch.setattr(pass_rows, "decode", counting)
    return calls


def test_pass_decodes_once_for_all_stages(dataset, count_decodes):
    summaries = run(dataset, [StatsStage(), MeanColour()], show_progress=False)
    assert [s.ok for s in summaries] == [12, 12]
    assert len(count_decodes) == 12  # not 24
    assert set(count_decodes) == {96}  # the larger of the two stages' needs
    assert dataset.read("embeddings").num_rows == dataset.read("stats").num_rows == 12


def test_pass_resumes_each_stage_on_its_own(dataset, count_decodes):
    run(dataset, StatsStage(), show_progress=False)[0]
    del count_decodes[:]
    stats, colour = run(dataset, [StatsStage(), MeanColour()], show_progress=False)
    assert stats.todo == 0 and colour.ok == 12
    assert len(count_decodes) == 12 and dataset.read("stats").num_rows == 12


class SwitchIntervalSeen(MeanColour):
    def process(self, batch):
        self.seen.append(sys.getswitchinterval())
        return super().process(batch)


def test_local_pass_hands_the_gil_over_quickly_and_restores_the_setting(dataset):
    """Decode threads wait for the GIL at every C call; at Python's 5 ms default a busy main
    thread makes them several times slower (bench/score.py --workers: busy_python_slowdown)."""
    before = sys.getswitchinterval()
    stage = SwitchIntervalSeen()
    stage.seen = []
    run(dataset, [StatsStage(), stage], show_progress=False)
    assert stage.seen and max(stage.seen) <= 0.0005 < before
    assert sys.getswitchinterval() == before


def test_pass_on_ray_writes_the_same_rows(dataset, ray_cluster):
    # this test module is not importable on Ray workers: ship MeanColour by value
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    columns = ["image_id", "model", "status", "embedding"]
    run(dataset, [StatsStage(), MeanColour()], show_progress=False)
    local = dataset.read("embeddings").select(columns).sort_by("image_id")
    for part in dataset.parts("embeddings") + dataset.parts("stats"):
        part.unlink()
    summaries = run(dataset, [StatsStage(), MeanColour()], engine="ray", show_progress=False)
    assert [s.ok for s in summaries] == [12, 12]
    assert dataset.read("embeddings").select(columns).sort_by("image_id").equals(local)
    assert dataset.read("stats").num_rows == 12


TORCH_FIRST = """
import sys
import torch
from curate.pipelines.executor import run
from curate.pipelines.stage import Stage
from curate.store import Dataset

torch.set_num_threads(2)
(torch.randn(500, 500) @ torch.randn(500, 500)).sum()  # OpenMP's threads start in this process


class TorchModel(Stage):
    table, columns, batch_size = "embeddings", ("image_id", "width"), 4

    def model_key(self):
        return "torch-model"

    def setup(self):
        torch.set_num_threads(2)

    def process(self, batch):
        x = torch.randn(len(batch["image_id"]), 256)
        return {"embedding": list((x @ torch.randn(256, 256))[:, :3].half().numpy())}


print(run(Dataset(sys.argv[1]), TorchModel(), show_progress=False)[0].ok)
"""


def test_a_pass_in_a_process_that_already_ran_torch_threads(dataset):
    """OpenMP's threads do not survive a fork, and the forking thread would wait for them
    forever: the pass process runs its models on a thread of its own."""
    import subprocess

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-c", TORCH_FIRST, str(dataset.root)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.split() == ["12"], proc.stderr
