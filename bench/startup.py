"""Benchmark: how long commands take from start to exit, where that is mostly imports.

Runs `curate --help`, `curate info`, `curate sql` on a one-image dataset and `curate score` of
one image with the tiny zoo (CLIP, WD14 ONNX, OWLv2; and CLIP, WD14 alone) on CPU, each as a fresh process, and
prints JSON: the median seconds of each, wall and CPU (user + system: on a loaded machine
the wall time is mostly waiting for a core, the CPU time is what the command costs). With
`--compare DIR` (a checkout of another version, e.g. old main) the same commands run from
there too, alternating the two versions run by run so that load on the machine falls on
both alike, and the ratios new/old are given.

    python bench/startup.py [--runs 5] [--compare /work/old-main]

`python -X importtime -m curate ...` shows where a command's start-up goes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup(tmp: Path) -> dict[str, list[str]]:
    """The one-image dataset and the tiny zoo; returns each command's arguments."""
    import numpy as np
    from PIL import Image

    (tmp / "src").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (600, 800, 3), np.uint8)
    Image.fromarray(pixels).save(tmp / "src" / "one.jpg", quality=90)
    for args in (["ingest", str(tmp / "src"), str(tmp / "ds"), "-q"],
                 ["models", "tiny", str(tmp / "zoo"), "--family", "open_clip", "--family", "wd14",
                  "--family", "owlv2"]):
        subprocess.run([sys.executable, "-m", "curate", *args], check=True, capture_output=True, cwd=tmp)
    zoo = tmp / "zoo"
    return {
        "help": ["--help"],
        "info": ["info", str(tmp / "ds")],
        "sql": ["sql", str(tmp / "ds"), "SELECT source, width, height FROM manifest"],
        "score_one_image": ["score", str(tmp / "ds"), "--clip", str(zoo / "open_clip"), "--tagger",
                            f"wd14:{zoo / 'wd14'}", "--watermark", f"owlv2:{zoo / 'owlv2'}", "--device", "cpu", "-q"],
        # without OWLv2, whose transformers modeling code imports torch._dynamo, timm and more whatever the CLIP
        "score_one_image_clip_wd14": ["score", str(tmp / "ds"), "--clip", str(zoo / "open_clip"), "--tagger",
                                      f"wd14:{zoo / 'wd14'}", "--device", "cpu", "-q"],
    }


def timed(version: Path | None, args: list[str], tmp: Path) -> tuple[float, float]:
    """Seconds from start to exit of `python -m curate ARGS`, wall and CPU, from `version`'s checkout
    (None: this one). A score run gets a fresh copy of the dataset, so it has its image to do."""
    if args[0] == "score":
        shutil.rmtree(tmp / "run", ignore_errors=True)
        shutil.copytree(tmp / "ds", tmp / "run")
        args = [args[0], str(tmp / "run"), *args[2:]]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if version is not None:
        env["PYTHONPATH"] = str(version)
    cpu, started = _children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "curate", *args], check=True, capture_output=True, env=env,
                   cwd=version or tmp)
    return time.perf_counter() - started, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout (old main) to time the same commands from")
    args = parser.parse_args()
    versions = {"new": None, **({"old": args.compare.resolve()} if args.compare else {})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commands = setup(tmp)
        result = {"cpus": os.cpu_count(), "runs": args.runs}
        for name, command in commands.items():
            times: dict[str, list[float]] = {v: [] for v in versions}
            cpu: dict[str, list[float]] = {v: [] for v in versions}
            for v, path in versions.items():  # once each first: caches warm for both alike
                timed(path, command, tmp)
            for _ in range(args.runs):
                for v, path in versions.items():
                    wall, used = timed(path, command, tmp)
                    times[v].append(wall)
                    cpu[v].append(used)
            figures = {f"{v}_s": round(statistics.median(t), 3) for v, t in times.items()}
            figures |= {f"{v}_cpu_s": round(statistics.median(t), 3) for v, t in cpu.items()}
            if "old" in times:
                figures["new_vs_old"] = round(statistics.median(times["new"]) / statistics.median(times["old"]), 3)
                figures["new_vs_old_cpu"] = round(statistics.median(cpu["new"]) / statistics.median(cpu["old"]), 3)
            result[name] = figures
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
