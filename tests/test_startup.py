"""Start-up: a command imports what it uses, when it runs (bench/startup.py times them)."""
import json
import os
import subprocess
import sys

from conftest import REPO

from curate.models.tiny import write_zoo

HEAVY = ("pyarrow", "pandas", "numpy", "torch", "onnx", "scipy", "PIL")


def modules_after(*args: str) -> set[str]:
    """The modules `curate ARGS` has imported by the time it exits (it must exit 0)."""
    code = ("import json, runpy, sys\nsys.argv = ['curate', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('curate', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def test_help_info_and_sql_import_no_heavy_library(dataset):
    for args in (["--help"], ["info", str(dataset.root)],
                 ["sql", str(dataset.root), "SELECT source, sources, width FROM manifest"],
                 ["sql", str(dataset.root), "SELECT * FROM images LIMIT 2", "--format", "json"]):
        loaded = {m.split(".")[0] for m in modules_after(*args)}
        assert not loaded & set(HEAVY), f"curate {' '.join(args)} imported {sorted(loaded & set(HEAVY))}"


def test_score_reads_the_onnx_input_size_without_importing_onnx(dataset, tmp_path):
    zoo = write_zoo(tmp_path / "zoo", ["wd14"])
    loaded = modules_after("score", str(dataset.root), "--tagger", f"wd14:{zoo['wd14']}", "--device", "cpu", "-q")
    assert dataset.query("SELECT count(*) AS n FROM tags WHERE status = 'ok'").to_pylist() == [{"n": 12}]
    assert "onnx" not in loaded and "onnxruntime" in loaded
