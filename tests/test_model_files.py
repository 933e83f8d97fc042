"""Damaged model files and a dataset path that is a file: one line naming the file and what
to do, exit 2, no traceback."""
import shutil

import pytest
from conftest import run_cli

from curate.models.tiny import write_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-damaged")


def damaged(zoo, family: str, file: str, how: str):
    """A copy of a tiny model with one file cut short or made invalid."""
    folder = zoo / f"{family}-{how}-{file.replace('/', '_')}"
    shutil.copytree(write_zoo(zoo / "whole", [family])[family], folder)
    target = folder / file
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if how == "truncated" else data[:-2] + b"}}{")
    return folder, target


@pytest.mark.parametrize("family, flag, file, how", [
    ("open_clip", "--clip", "open_clip_model.safetensors", "truncated"),
    ("open_clip", "--clip", "open_clip_config.json", "broken"),
    ("joytag", "--tagger", "model.safetensors", "truncated"),
    ("joytag", "--tagger", "config.json", "broken"),
    ("wd14", "--tagger", "model.onnx", "truncated"),
    ("owlv2", "--watermark", "config.json", "broken"),
    ("quality_head", "--quality", "head.safetensors", "truncated"),
])
def test_a_damaged_model_file_is_one_line_naming_it(dataset, zoo, family, flag, file, how):
    folder, target = damaged(zoo, family, file, how)
    value = str(folder) if flag in ("--clip", "--quality") else f"{family}:{folder}"
    proc = run_cli("score", str(dataset.root), flag, value, "-q", check=False)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert said.startswith("error:") and "Traceback" not in said, proc.stderr
    assert str(target) in said.replace(" ", "") or str(target) in said, said  # the file, by name


def test_a_dataset_path_that_is_a_file(tmp_path, image_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a dataset")
    for args in (["hash", str(a_file)], ["ingest", str(image_dir), str(a_file)], ["sql", str(a_file), "SELECT 1"]):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and "is a file, not a dataset directory" in " ".join(proc.stderr.split())
        assert "Traceback" not in proc.stderr
