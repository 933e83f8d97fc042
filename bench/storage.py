"""Benchmark: what reference ingest and object storage cost, printed as JSON.

    python bench/storage.py [--images 64] [--side 1024] [--latents 1024] [--steps 8]

- bytes: the dataset's own bytes per image after `ingest --copy` and `ingest --reference`
  of the same files, against the images' own size.
- pass: `curate hash` images/s over a referenced dataset (each image read at its source,
  stat-checked and sha256-verified) against a copied one (bytes read from Parquet), in the
  same run; and what the sha256 check costs, as a fraction of the referenced pass's time.
- trainer: the tiny SDXL trained on the same latents (4x64x64 float16, 512px images)
  from local disk and from a real S3 API server on loopback (moto's server mode, tests/
  s3_server.py): seconds from opening the dataset to the end of the first step, samples/s
  over the following steps, and the fraction of that time the step loop waited for data.
  The cache holds one row group, so every batch reads row groups from storage, as for a
  table far larger than memory. Loopback has no network latency: a real bucket adds
  ~10-50 ms per request, which the figures here do not show.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import write_images  # noqa: E402  (bench/ingest.py: synthetic photos)

from curate.pipelines.executor import run  # noqa: E402
from curate.pipelines.ingest import ingest  # noqa: E402
from curate.pipelines.stats import StatsStage  # noqa: E402
from curate.store import Dataset  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def ingest_and_pass(tmp: Path, n: int, side: int) -> dict:
    paths = write_images(tmp / "images", n, side, duplicates=False)
    images = folder_bytes(tmp / "images")
    out = {"images": n, "image_mib": round(images / 2**20, 1)}
    seconds = {}
    for mode in ("copy", "reference"):
        ds = Dataset(tmp / mode, create=True)
        started = time.perf_counter()
        ingest([str(tmp / "images")], ds, show_progress=False, reference=mode == "reference")
        out[f"ingest_{mode}_images_per_s"] = round(n / (time.perf_counter() - started), 1)
        ds_bytes = folder_bytes(ds.root)
        out[f"dataset_bytes_per_image_{mode}"] = round(ds_bytes / n)
        out[f"dataset_fraction_of_images_{mode}"] = round(ds_bytes / images, 4)
    for mode in ("copy", "reference", "copy", "reference"):  # alternated: the machine is noisy
        ds = Dataset(tmp / mode)
        for part in ds.parts("stats"):
            os.unlink(part)  # a fresh pass each time
        started = time.perf_counter()
        run(ds, StatsStage(), show_progress=False)
        seconds.setdefault(mode, []).append(time.perf_counter() - started)
    for mode, times in seconds.items():
        out[f"pass_{mode}_images_per_s"] = round(n / min(times), 1)
    out["pass_reference_over_copy"] = round(min(seconds["copy"]) / min(seconds["reference"]), 3)
    started = time.perf_counter()
    for p in paths:
        hashlib.sha256(p.read_bytes()).hexdigest()
    out["sha256_fraction_of_reference_pass"] = round((time.perf_counter() - started) / min(seconds["reference"]), 3)
    return out


def train_timing(location: str, sdxl: str, output: Path, steps: int) -> dict:
    from curate.trainer.config import load_config
    from curate.trainer.train import Trainer

    config = load_config(None, output=str(output), batch_size=4, precision="fp32", max_steps=steps + 1,
                         validate_every=0, checkpoint_every=10_000, validation_fraction=0.0, latent_cache_mib=1)
    started = time.perf_counter()
    trainer = Trainer(location, sdxl, config)
    trainer.train_step(0)
    first = time.perf_counter() - started
    trainer.data_wait = 0.0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step(step)
    seconds = time.perf_counter() - started
    return {"seconds_to_first_step": round(first, 2), "samples_per_s": round(4 * steps / seconds, 2),
            "waiting_for_data_fraction": round(trainer.data_wait / seconds, 3)}


def trainer_local_vs_s3(tmp: Path, rows: int, steps: int) -> dict:
    import pyarrow.fs as pafs

    from curate.models.tiny import write_zoo
    from tests.s3_server import S3Server
    from tests.trainer_helpers import make_latent_dataset

    sdxl = str(write_zoo(tmp / "zoo", ["sdxl"])["sdxl"])
    # parts of 4 MiB: one PUT each (moto answers the multipart upload pyarrow uses past ~10 MiB with an error)
    make_latent_dataset(tmp / "latents", rows, buckets=[(64, 64)], rows_per_group=32, latent_parts=rows // 32)
    with S3Server() as s3:
        s3.client.create_bucket(Bucket="bench")
        pafs.copy_files(str(tmp / "latents" / "tables"), "bench/ds/tables",
                        destination_filesystem=Dataset("s3://bench/ds", create=True).fs)
        results = {}
        for where in ("local", "s3", "local", "s3"):
            location = str(tmp / "latents") if where == "local" else "s3://bench/ds"
            timing = train_timing(location, sdxl, tmp / f"run-{where}-{len(results)}", steps)
            results.setdefault(where, []).append(timing)
    best = {where: min(runs, key=lambda r: r["seconds_to_first_step"]) for where, runs in results.items()}
    out = {f"trainer_{where}": r for where, r in best.items()}
    out["trainer_rows"], out["trainer_latent"] = rows, "4x64x64 float16"
    s3, local = best["s3"], best["local"]
    out["first_step_s3_over_local"] = round(s3["seconds_to_first_step"] / local["seconds_to_first_step"], 3)
    out["samples_per_s_s3_over_local"] = round(s3["samples_per_s"] / local["samples_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = ingest_and_pass(Path(tmp) / "pass", args.images, args.side)
        out |= trainer_local_vs_s3(Path(tmp) / "train", args.latents, args.steps)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
