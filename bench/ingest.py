"""Benchmark: ingest and `curate hash` on both engines against a bare PIL loop.

Prints JSON: images/s of each pipeline, of a bare single-threaded PIL loop doing the
same decoding over the same files in the same run, their ratio (the pipeline's overhead;
above 1 means the pipeline's threads or tasks beat the bare loop), and the speed-up of
JPEG draft decoding on large photos.

    python bench/ingest.py [--images 200] [--side 1024] [--engines local,ray]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.images import decode  # noqa: E402
from curate.pipelines.executor import run  # noqa: E402
from curate.pipelines.ingest import ingest  # noqa: E402
from curate.pipelines.ray_executor import init_ray  # noqa: E402
from curate.pipelines.stats import StatsStage  # noqa: E402
from curate.store import Dataset  # noqa: E402


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, not like a flat test card."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / width * rng.uniform(1, 6) + y / height * rng.uniform(1, 6) + c)
                    for c in range(3)], -1)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, n: int, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    base = [photo(rng, side, side * 3 // 4) for _ in range(8)]
    paths = []
    for i in range(n):
        img = base[i % 8].rotate(i * 7 % 360) if i >= 8 else base[i]  # all different bytes
        fmt, ext = ("PNG", "png") if i % 10 == 9 else ("JPEG", "jpg")
        path = folder / f"{i:05d}.{ext}"
        img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def bare_loop(paths: list[Path], min_side: int | None, hash_bytes: bool, stage=None) -> float:
    """Images/s of plain PIL: read, (sha256), open, draft like the pipeline does, load, RGB,
    then (for a stage) the stage's own per-image maths: what is left is pipeline overhead."""
    started = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        if hash_bytes:
            hashlib.sha256(data).hexdigest()
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            scale = min_side / min(img.size)
            img.draft("RGB", (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        img.load()
        rgb = img.convert("RGB")
        if stage is not None:
            stage.process(_one(stage.prepare({"image": _Decoded(rgb)})))
    return len(paths) / (time.perf_counter() - started)


class _Decoded:
    def __init__(self, image):
        self.image = image


def _one(prepared: dict) -> dict:
    return {k: [v] for k, v in prepared.items()}


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def draft_speedup(folder: Path, min_side: int = 512, n: int = 4) -> dict:
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        photo(rng, 4000, 3000).save(buf, "JPEG", quality=92)
        blobs.append(buf.getvalue())
    full = timed(lambda: [decode(b) for b in blobs]) / n
    draft = timed(lambda: [decode(b, min_side=min_side) for b in blobs]) / n
    return {"image": "4000x3000 JPEG", "min_side": min_side, "full_ms": round(full * 1000, 1),
            "draft_ms": round(draft * 1000, 1), "speedup": round(full / draft, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=1024, help="width of the generated photos")
    parser.add_argument("--engines", default="local,ray")
    args = parser.parse_args()
    engines = args.engines.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "images", args.images, args.side)
        n = len(paths)
        # Warm the page cache and imports, so the first contestant pays no extra.
        bare_loop(paths[:10], 1, True)
        result = {"images": n, "size": f"{args.side}x{args.side * 3 // 4}", "cpus": os.cpu_count()}
        bare_ingest = bare_loop(paths, 1, hash_bytes=True)  # ingest validates at 1/8 scale
        bare_hash = bare_loop(paths, StatsStage.decode_min_side, hash_bytes=False, stage=StatsStage())
        result["bare_pil"] = {"ingest_like_images_per_s": round(bare_ingest, 1),
                              "hash_like_images_per_s": round(bare_hash, 1)}
        if "ray" in engines:
            init_ray()  # starting the cluster is not part of any command's figure
        for engine in engines:
            # Each command pays fixed costs (Ray starts worker processes and a model actor,
            # and imports our modules in each); a real run has a million images. So each
            # engine runs a small set, then the full set: the difference is the per-image
            # (marginal) rate, the figure that matters at scale, next to the plain rate.
            warm = Dataset(tmp / f"warm-{engine}", create=True)  # first use: Ray starts its workers
            ingest([str(p) for p in paths[:4]], warm, show_progress=False, engine=engine)
            run(warm, StatsStage(), engine=engine, show_progress=False)
            small = Dataset(tmp / f"small-{engine}", create=True)
            k = max(1, n // 4)
            t_ingest_small = timed(lambda: ingest([str(p) for p in paths[:k]], small, show_progress=False,
                                                  engine=engine))
            t_hash_small = timed(lambda: run(small, StatsStage(), engine=engine, show_progress=False))
            ds = Dataset(tmp / f"ds-{engine}", create=True)
            t_ingest = timed(lambda: ingest([str(tmp / "images")], ds, show_progress=False, engine=engine))
            t_hash = timed(lambda: run(ds, StatsStage(), engine=engine, show_progress=False))
            # None when noise (other load on the machine) made the small run the slower one.
            marginal_ingest = (n - k) / (t_ingest - t_ingest_small) if t_ingest > t_ingest_small else None
            marginal_hash = (n - k) / (t_hash - t_hash_small) if t_hash > t_hash_small else None
            result[engine] = {
                "ingest_images_per_s": round(n / t_ingest, 1),
                "ingest_vs_bare": round(n / t_ingest / bare_ingest, 2),
                "ingest_marginal_images_per_s": _round(marginal_ingest),
                "ingest_marginal_vs_bare": _round(marginal_ingest and marginal_ingest / bare_ingest, 2),
                "hash_images_per_s": round(n / t_hash, 1),
                "hash_vs_bare": round(n / t_hash / bare_hash, 2),
                "hash_marginal_images_per_s": _round(marginal_hash),
                "hash_marginal_vs_bare": _round(marginal_hash and marginal_hash / bare_hash, 2),
            }
        result["draft_decoding"] = draft_speedup(tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
