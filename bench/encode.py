"""Latent storage and encode throughput. Prints JSON.

    python bench/encode.py                                # tiny random-weight VAE on CPU
    python bench/encode.py --real-size --device cuda      # SDXL VAE architecture, random bf16 weights, 1024x1024

The default mode ingests --images synthetic JPEGs (~1 MP), runs `curate encode` on them
(sd15 buckets, tiny VAE) and reports:
- storage: bytes per latent in the Parquet shards (zstd) against the raw float16 bytes and
  against gzip of the same bytes (bigASP's way: one .gz per latent);
- reading: latents/s decoded to arrays from the shards against from one gzip file each;
- encode: images/s of the whole encode pass against the same VAE on the same crops at the
  pass's batch size and thread count, plus a bare decode + Lanczos + crop loop over the same
  images, run one after the other (`encode_vs_vae_plus_decode`: above 1 when decoding on the
  other threads overlaps the VAE); with `--compare DIR` also the pass of another checkout
  (old main) on the same images, alternating, in fresh processes (imports not counted).
The real-size mode encodes random 1024x1024 batches with the SDXL VAE's encoder
architecture and reports images/s and the fraction of the device's peak FLOP rate.
Latents of a random-weight VAE on synthetic images compress differently from real ones:
read the storage figures as the format's overhead, not as the real ratio.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SDXL_VAE = dict(  # stabilityai/sdxl-vae config.json, weights random
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


# The encode pass in a fresh process of one version; prints its seconds (imports not counted)
ENCODE = """import sys, time
from {dataset} import Dataset
from {buckets} import parse_bucket_set
from {vae} import {vae_class} as Vae
from {encode} import EncodeStage
from {run} import {run_function} as run
ds = Dataset(sys.argv[1])
started = time.perf_counter()
run(ds, [EncodeStage([Vae.parse(sys.argv[2])], parse_bucket_set("sd15"), device="cpu")], show_progress=False)
print(time.perf_counter() - started)
"""
MODULES = {"new": {"dataset": "curate.store", "buckets": "curate.buckets", "vae": "curate.models.vae",
                   "vae_class": "Vae", "encode": "curate.pipelines.encode", "run": "curate.pipelines.executor",
                   "run_function": "run"},
           "old": {"dataset": "curate.manifest", "buckets": "curate.buckets", "vae": "models.vae",
                   "vae_class": "VaeSpec", "encode": "pipelines.encode", "run": "pipelines.runner",
                   "run_function": "run_stages"}}


def compare(ds: Path, vae: str, old: Path, runs: int = 3) -> dict:
    """The encode pass of this checkout against `old`'s on copies of the same dataset, alternating."""
    seconds: dict[str, list[float]] = {"new": [], "old": []}
    for _ in range(runs):
        for version, checkout in (("new", Path(__file__).resolve().parents[1]), ("old", old)):
            copy = ds.with_name(f"cmp-{version}")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ds, copy, ignore=shutil.ignore_patterns("latents", "manifest.duckdb"))
            out = subprocess.run([sys.executable, "-c", ENCODE.format(**MODULES[version]), str(copy), vae],
                                 env=dict(os.environ, PYTHONPATH=str(checkout)), cwd=checkout, check=True,
                                 capture_output=True, text=True).stdout
            seconds[version].append(float(out.split()[-1]))
    new, old_s = float(np.median(seconds["new"])), float(np.median(seconds["old"]))
    return {"new_s": round(new, 2), "old_s": round(old_s, 2), "new_vs_old_speed": round(old_s / new, 2)}


def tiny_cpu(n_images: int, old: Path | None) -> dict:
    from curate.buckets import choose_bucket, parse_bucket_set, plan_crop
    from curate.cli.demo import synthetic_image
    from curate.images import decode
    from curate.models.tiny import write_zoo
    from curate.models.vae import Vae
    from curate.pipelines.encode import EncodeStage, crop_pixels, image_seed
    from curate.pipelines.executor import run
    from curate.pipelines.ingest import ingest
    from curate.pipelines.rows import _collate, setup_stages
    from curate.store import Dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    rng = np.random.default_rng(0)
    (tmp / "src").mkdir()
    for i in range(n_images):
        w, h = [(1216, 832), (832, 1216), (1024, 1024), (1344, 768)][i % 4]
        synthetic_image(rng, w, h).save(tmp / "src" / f"{i:04d}.jpg", quality=90)
    ds = Dataset(tmp / "ds", create=True)
    ingest([str(tmp / "src")], ds, show_progress=False)
    vae = str(write_zoo(tmp / "zoo", ["vae"])["vae"])
    buckets = parse_bucket_set("sd15")

    # the bare loop: decode at the needed size, Lanczos, crop; no model, no executor, no Parquet
    rows = ds.read("images", ["image_id", "bytes", "width", "height"]).to_pylist()
    started = time.perf_counter()
    for r in rows:
        bucket = choose_bucket(r["width"], r["height"], buckets.buckets)
        crop = plan_crop(r["width"], r["height"], bucket, "random", image_seed(0, r["image_id"], "crop"))
        crop_pixels(decode(r["bytes"], min(crop.resized_width, crop.resized_height)).image, crop)
    bare = len(rows) / (time.perf_counter() - started)

    stage = EncodeStage([Vae(vae)], buckets, device="cpu")
    # the model alone: the VAE on the crops the pass makes, in batches of one bucket at the
    # pass's batch size, on the threads the pass gives it
    setup_stages([stage])
    by_bucket: dict = {}
    for r in rows:
        p = stage.prepare(dict(r))
        by_bucket.setdefault(stage.batch_key(p), []).append((r["image_id"], p))
    batches = [items[k:k + stage.batch_size] for items in by_bucket.values()
               for k in range(0, len(items), stage.batch_size)]
    started = time.perf_counter()
    for batch in batches:
        stage.process(_collate("image_id", [i for i, _ in batch], [p for _, p in batch]))
    vae_only = len(rows) / (time.perf_counter() - started)
    summary = run(ds, EncodeStage([Vae(vae)], buckets, device="cpu"), show_progress=False)[0]
    encode_rate = summary.ok / summary.seconds

    table = ds.read("latents")
    latents = [b for b in table.column("latent").to_pylist() if b]
    shard_bytes = sum(p.stat().st_size for p in ds.parts("latents"))
    gz_dir = tmp / "gz"
    gz_dir.mkdir()
    for i, b in enumerate(latents):
        (gz_dir / f"{i}.gz").write_bytes(gzip.compress(b))
    gz_bytes = sum(p.stat().st_size for p in gz_dir.iterdir())

    started = time.perf_counter()
    n = 0
    for part in ds.parts("latents"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(part).iter_batches(columns=["latent", "shape"]):
            for blob, shape in zip(batch.column("latent").to_pylist(), batch.column("shape").to_pylist()):
                np.frombuffer(blob, np.float16).reshape(shape)
                n += 1
    from_shards = n / (time.perf_counter() - started)
    shapes = table.column("shape").to_pylist()
    started = time.perf_counter()
    for i in range(len(latents)):
        np.frombuffer(gzip.decompress((gz_dir / f"{i}.gz").read_bytes()), np.float16).reshape(shapes[i])
    from_gzip = len(latents) / (time.perf_counter() - started)

    raw = sum(len(b) for b in latents)
    return {
        "mode": "tiny VAE on CPU (random weights, synthetic ~1 MP JPEGs, sd15 buckets)",
        "images": n_images, "latents": len(latents), "latent_shapes": sorted({str(s) for s in shapes}),
        "bytes_per_latent": {"raw_float16": round(raw / len(latents)),
                             "parquet_zstd_shard": round(shard_bytes / len(latents)),
                             "gzip_per_file": round(gz_bytes / len(latents)),
                             "shard_vs_raw": round(shard_bytes / raw, 3), "gzip_vs_raw": round(gz_bytes / raw, 3),
                             "note": "shard bytes include every column (sizes, crop, ids), not only the latent"},
        "latents_read_per_s": {"parquet_shards": round(from_shards), "gzip_files": round(from_gzip)},
        "images_per_s": {"encode_pass": round(encode_rate, 1), "bare_decode_resize_crop": round(bare, 1),
                         "vae_only": round(vae_only, 1), "batch_size": stage.batch_size,
                         "vae_threads": stage.resources.cpus, "encode_vs_bare": round(encode_rate / bare, 3),
                         "encode_vs_vae_plus_decode": round(encode_rate * (1 / bare + 1 / vae_only), 3)},
        **({"old_vs_new_pass": compare(tmp / "ds", vae, old)} if old else {}),
    }


def real_size(device: str, batch_size: int, steps: int, peak_tflops: float | None, size: int) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    vae = AutoencoderKL(**SDXL_VAE).to(device, torch.bfloat16).eval()
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            vae.encode(x[:1])
        flops_per_image = counter.get_total_flops()
        vae.encode(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            vae.encode(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rate = batch_size * steps / seconds
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = rate * flops_per_image / 1e12
    return {"mode": f"SDXL VAE encoder architecture, random bf16 weights, {size}x{size}", "device": name,
            "batch_size": batch_size, "images_per_s": round(rate, 2),
            "gflops_per_image": round(flops_per_image / 1e9, 1),
            "achieved_tflops": round(achieved, 2), "peak_tflops": peak,
            "fraction_of_flop_bound": round(achieved / peak, 3) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--real-size", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024, help="real-size mode: image side in pixels")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: looked up by name)")
    parser.add_argument("--compare", type=Path, help="another checkout (old main): its encode pass on the same images")
    args = parser.parse_args()
    if args.real_size:
        result = real_size(args.device, args.batch_size, args.steps, args.peak_tflops, args.size)
    else:
        result = tiny_cpu(args.images, args.compare and args.compare.resolve())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
