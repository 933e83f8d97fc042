"""Benchmark: `curate export` images/s for each format against a plain copy of the same files.

The source is a kohya folder: photos (JPEG, every tenth PNG) with a caption file each. The
plain copy is what a user would otherwise run: `shutil.copyfile` (sendfile) of every image
and caption file into an empty folder, one after another, as `cp -r` does. Each export
writes a fresh DEST from a dataset holding the same images (the whole command: selecting
the rows, reading the bytes, writing every file); each run starts after `sync`, with the
inputs warm in the page cache, so the figures compare the work done, not the disk. A plain
copy runs before every export and the medians are printed as JSON, with each format's ratio
to the copy (the target is at least 0.8).

    python bench/export.py [--images 500] [--side 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import photo  # noqa: E402
from curate.pipelines.export import export  # noqa: E402
from curate.pipelines.ingest import ingest  # noqa: E402
from curate.store import Dataset  # noqa: E402

RUNS = {"kohya": {"fmt": "kohya"}, "kohya --link hard": {"fmt": "kohya", "link": "hard"},
        "imagefolder": {"fmt": "imagefolder"}, "webdataset": {"fmt": "webdataset"}, "parquet": {"fmt": "parquet"}}


def write_photos(folder: Path, n: int, side: int) -> list[Path]:
    """n different photos (a few bases, rotated, each with its own marker pixel) and a caption file each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    base = [photo(rng, side, side * 3 // 4) for _ in range(8)]
    paths = []
    for i in range(n):
        img = base[i % 8].rotate(i * 7 % 360)
        img.putpixel((i % side, 0), (i % 256, 255 - i % 256, 0))
        fmt, ext = ("PNG", "png") if i % 10 == 9 else ("JPEG", "jpg")
        path = folder / f"{i:05d}.{ext}"
        img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        path.with_suffix(".txt").write_text(f"a photo number {i} ||| photo, test, number_{i}")
        paths.append(path)
    return paths


def plain_copy(paths: list[Path], dest: Path) -> float:
    dest.mkdir()
    os.sync()  # every run starts with no dirty pages of the one before (writeback would slow it)
    started = time.perf_counter()
    for path in paths:
        shutil.copyfile(path, dest / path.name)
        shutil.copyfile(path.with_suffix(".txt"), dest / f"{path.stem}.txt")
    return time.perf_counter() - started


def timed_export(ds: Dataset, dest: Path, **kw) -> float:
    os.sync()
    started = time.perf_counter()
    export(ds, dest, show_progress=False, **kw)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--side", type=int, default=1024, help="width of the generated photos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:  # one file system: hard links
        tmp = Path(tmp)
        paths = write_photos(tmp / "images", args.images, args.side)
        ds = Dataset(tmp / "ds", create=True)
        ingest([str(tmp / "images")], ds, show_progress=False)
        seconds: dict[str, list[float]] = {"plain copy": [], **{name: [] for name in RUNS}}
        for r in range(args.repeats):
            for name, kw in RUNS.items():  # the copy before each export, so drift hits both alike
                seconds["plain copy"].append(plain_copy(paths, tmp / f"copy{r}"))
                seconds[name].append(timed_export(ds, tmp / f"{name.replace(' ', '')}{r}", **kw))
                for leftover in tmp.iterdir():
                    if leftover.name not in ("images", "ds"):
                        shutil.rmtree(leftover)
        n = len(paths)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        rates = {name: n / statistics.median(s) for name, s in seconds.items()}
        print(json.dumps({
            "images": n, "mb": round(mb, 1), "repeats": args.repeats,
            "images_per_s": {name: round(rate, 1) for name, rate in rates.items()},
            "ratio_to_plain_copy": {name: round(rate / rates["plain copy"], 2) for name, rate in rates.items()
                                    if name != "plain copy"},
        }, indent=1))


if __name__ == "__main__":
    main()
