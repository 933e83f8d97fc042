"""Benchmark: `curate export` images/s for each format against a plain copy of the same files.

The source is a kohya folder: photos (JPEG, every tenth PNG) with a caption file each. The
plain copy is what a user would otherwise run: `shutil.copyfile` (sendfile) of every image
and caption file into an empty folder, one after another, as `cp -r` does. Each export
writes a fresh DEST from a dataset holding the same images (the whole command: selecting
the rows, reading the bytes, writing every file); each run starts after `sync`, with the
inputs warm in the page cache, so the figures compare the work done, not the disk. A plain
copy runs before every export; medians of the repeats are printed as JSON.

A command pays a fixed cost (the selection query, the files written once) that a real
export of a million images spreads thin, so each contestant also runs on a quarter of the
images: the difference is the per-image (marginal) rate, the figure that matters at scale,
printed next to the plain rate, each as a ratio to the copy's (the target is at least 0.8).

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
        n, k = len(paths), max(1, len(paths) // 4)
        small, full = Dataset(tmp / "small", create=True), Dataset(tmp / "full", create=True)
        ingest([str(p) for p in paths[:k]], small, show_progress=False)
        ingest([str(tmp / "images")], full, show_progress=False)
        timed_export(small, tmp / "warm", fmt="parquet")  # imports (datasets, for parquet) are not part of a figure
        seconds: dict[str, dict[str, list[float]]] = {name: {"small": [], "full": []}
                                                      for name in ["plain copy", *RUNS]}
        for r in range(args.repeats):
            for name, kw in RUNS.items():  # a copy before each export, so drift hits both alike
                for size, ds, files in (("small", small, paths[:k]), ("full", full, paths)):
                    seconds["plain copy"][size].append(plain_copy(files, tmp / f"copy-{size}"))
                    seconds[name][size].append(timed_export(ds, tmp / f"out-{size}", **kw))
                    for leftover in tmp.iterdir():
                        if leftover.name not in ("images", "small", "full"):
                            shutil.rmtree(leftover)
        rates, marginal = {}, {}
        for name, s in seconds.items():
            t_small, t_full = statistics.median(s["small"]), statistics.median(s["full"])
            rates[name] = n / t_full
            marginal[name] = (n - k) / (t_full - t_small) if t_full > t_small else None  # None: noise won
        copy, copy_marginal = rates["plain copy"], marginal["plain copy"]
        print(json.dumps({
            "images": n, "small": k, "mb": round(sum(p.stat().st_size for p in paths) / 1e6, 1),
            "repeats": args.repeats,
            "images_per_s": {name: round(rate, 1) for name, rate in rates.items()},
            "marginal_images_per_s": {name: rate and round(rate, 1) for name, rate in marginal.items()},
            "ratio_to_plain_copy": {name: round(rate / copy, 2) for name, rate in rates.items()
                                    if name != "plain copy"},
            "marginal_ratio_to_plain_copy": {name: rate and copy_marginal and round(rate / copy_marginal, 2)
                                             for name, rate in marginal.items() if name != "plain copy"},
        }, indent=1))


if __name__ == "__main__":
    main()
