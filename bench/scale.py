"""Benchmark: the store at bigASP's size. Builds synthetic datasets of 150k and 1.5M images'
rows across every table and prints JSON: seconds and peak memory (MiB) of each command that
reads them, each run as a fresh process, so that growth with the dataset shows.

    python bench/scale.py [--sizes 150000,1500000] [--compare /work/old-main] [--keep DIR]

What is measured, on each size:
- info: `curate info DS`; sql: `curate sql DS` grouping the whole manifest by rank;
- where: the ids a `--where` over the manifest selects (`Dataset.select_ids`);
- todo: a stage's to-do computation when 99% is done (`curate hash`'s: the images without
  stats rows) and reading the first batch of its input;
- train: `curate train` with the tiny SD1.5 from start to the end of its first step; train_again:
  the same once more, as a resumed run starts (the stage tables' join is kept in DS/cache).
With `--compare DIR` each also runs from that checkout (old main, its own module names),
alternating the two, and the ratio new/old is given.

The rows are synthetic but shaped like a real run's: images have 3% duplicate sources and 1%
errors, 700 rows per part (1 GiB of 1.5 MB JPEGs each; before parts were streamed to disk they
were cut at 256 MiB, 170 photos); fast stages write parts of 2048 rows, captions parts of 100
(a minute of a VLM's work each), so 1.5M images make ~20,000 parts.
Image bytes are left out (the 1% still to hash hold a tiny JPEG), embeddings are 512 float16
(ViT-B/32's), tags ~30 of a 10,000-tag vocabulary, captions ~60 words, and latents 4x8x8
(SDXL's are 4x128x128: only the one row group the first step reads would be larger).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.schema import SCHEMAS  # noqa: E402
from curate.store import schema_tag  # noqa: E402

IMAGE_PART_ROWS, STAGE_PART_ROWS, CAPTION_PART_ROWS = 700, 2048, 100
WORDS = np.array("a the photo of woman man cat dog sitting standing red blue green light dark tree sky city "
                 "street night day smiling portrait close up wearing dress hat outdoors indoors water".split())
SD15_SCALING = 0.18215  # the VAE of the base `train` uses: the trainer refuses latents of another scaling
MODELS = {"stats": "stats-v1", "buckets": "sdxl"}  # the `model` values of `curate hash` and `curate buckets`
# What each version calls things: (module of Dataset, module of todo_ids and input_rows, module of StatsStage)
MODULES = {"new": ("curate.store", "curate.pipelines.work", "curate.pipelines.stats"),
           "old": ("curate.manifest", "pipelines.runner", "pipelines.stats")}
TRAIN_TOML = """max_steps = 1
batch_size = 4
validate_every = 0
stable_train_samples = 4
checkpoint_every = 1000
precision = "fp32"
"""


def ids_for(n: int) -> list[str]:
    return [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(n)]


def write(folder: Path, k: int, table: pa.Table) -> None:
    # named as curate names its parts: with the tag of the schema they were written with
    pq.write_table(table, folder / f"part-{k:020d}-{k % 10**8:08x}-{schema_tag(folder.name)}.parquet",
                   compression="zstd")


def parts(root: Path, name: str, ids: list[str], rows_per_part: int, make) -> None:
    """Write the table `name` for `ids` in parts of `rows_per_part`; make(ids, rng, start) gives the
    columns of the part that starts at ids[start]."""
    folder = root / "tables" / name
    folder.mkdir(parents=True)
    schema, rng = SCHEMAS[name], np.random.default_rng(len(name))
    for k, start in enumerate(range(0, len(ids), rows_per_part)):
        chunk = ids[start:start + rows_per_part]
        n = len(chunk)
        stage = {"image_id": chunk, "model": [MODELS.get(name, f"{name}-model")] * n, "status": ["ok"] * n,
                 "created_at": [datetime(2025, 1, 1, tzinfo=timezone.utc)] * n}
        columns = stage | make(chunk, rng, start)
        write(folder, k, pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema))


def lists(rng, n: int, values: pa.Array, mean: int) -> pa.Array:
    counts = rng.poisson(mean, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, values.take(pa.array(rng.zipf(1.3, offsets[-1]) % len(values))))


def build(root: Path, n: int) -> None:
    ids = ids_for(n)
    tiny = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(tiny, "JPEG")
    hashed = n - n // 100  # the last 1% still to hash: they hold bytes

    def images(chunk, rng, first):
        k = len(chunk)
        return {"source": [f"/data/photos/{i[:2]}/{i[2:12]}.jpg" for i in chunk],
                "bytes": [tiny.getvalue() if first + j >= hashed else None for j in range(k)],
                "size_bytes": rng.integers(200_000, 4_000_000, k), "width": rng.choice([2560, 1600, 1024, 4000], k),
                "height": rng.choice([1600, 2560, 1024, 3000], k), "format": ["JPEG"] * k, "mode": ["RGB"] * k,
                "animated": [False] * k}

    dup = ids[: n * 3 // 100]  # duplicate sources (no bytes), and error rows
    parts(root, "images", ids, IMAGE_PART_ROWS, images)
    folder = root / "tables" / "images"
    count = len(list(folder.iterdir()))
    extra = {"image_id": dup + [None] * (n // 100),
             "source": [f"/data/more/{i}.jpg" for i in range(len(dup) + n // 100)]}
    m = len(extra["source"])
    extra |= {"status": ["ok"] * len(dup) + ["error"] * (n // 100),
              "error": [None] * len(dup) + ["truncated"] * (n // 100),
              "created_at": [datetime(2025, 1, 2, tzinfo=timezone.utc)] * m}
    for k, start in enumerate(range(0, m, IMAGE_PART_ROWS * 4)):
        piece = {c: v[start:start + IMAGE_PART_ROWS * 4] for c, v in extra.items()}
        rows = len(piece["source"])
        schema = SCHEMAS["images"]
        write(folder, count + k, pa.table({f.name: piece.get(f.name, pa.nulls(rows, f.type)) for f in schema},
                                          schema=schema))

    vocab = pa.array([f"tag_{k}" for k in range(10_000)])
    parts(root, "stats", ids[:hashed], STAGE_PART_ROWS, lambda c, rng, _: {
        "phash": pa.array(rng.integers(0, 2**63, len(c)), pa.uint64()),
        **{name: rng.random(len(c), np.float32) for name in ("brightness", "sharpness", "colorfulness", "entropy")}})
    parts(root, "embeddings", ids, STAGE_PART_ROWS, lambda c, rng, _: {"embedding": pa.ListArray.from_arrays(
        np.arange(0, 512 * len(c) + 1, 512, dtype=np.int32),
        pa.array(rng.standard_normal(512 * len(c), np.float32).astype(np.float16)))})
    parts(root, "quality", ids, STAGE_PART_ROWS, lambda c, rng, _: {
        "rank": pa.array(rng.integers(0, 10, len(c)), pa.int8()), "probs": pa.ListArray.from_arrays(
            np.arange(0, 10 * len(c) + 1, 10, dtype=np.int32), pa.array(rng.random(10 * len(c), np.float32)))})

    def tags(chunk, rng, _):
        listed = lists(rng, len(chunk), vocab, 30)
        scores = pa.ListArray.from_arrays(listed.offsets, pa.array(rng.random(len(listed.values), np.float32)))
        return {"tags": listed, "tag_scores": scores, "rating": rng.choice(["general", "sensitive"], len(chunk)),
                "rating_score": rng.random(len(chunk), np.float32)}

    parts(root, "tags", ids, STAGE_PART_ROWS, tags)
    parts(root, "captions", ids, CAPTION_PART_ROWS, lambda c, rng, _: {
        "prompt": ["Write a detailed description of this image in a few sentences."] * len(c),
        "caption": [" ".join(rng.choice(WORDS, 60)) + "." for _ in c]})

    def watermarks(chunk, rng, _):
        score = rng.random(len(chunk), np.float32) * 0.2
        box = {"x0": 0.7, "y0": 0.9, "x1": 0.95, "y1": 0.98, "score": 0.5}
        return {"score": score, "has_watermark": score > 0.1, "boxes": [[box] if s > 0.1 else [] for s in score]}

    parts(root, "watermarks", ids, STAGE_PART_ROWS, watermarks)
    parts(root, "buckets", ids, STAGE_PART_ROWS, lambda c, rng, _: {"bucket_width": [1024] * len(c),
                                                                  "bucket_height": [1024] * len(c)})

    def latents(chunk, rng, _):
        k = len(chunk)
        shapes = [[4, 8, 8], [4, 8, 12], [4, 12, 8]]
        which = rng.integers(0, 3, k)
        return {"latent": [rng.standard_normal(int(np.prod(shapes[w])), np.float32).astype(np.float16).tobytes()
                           for w in which], "shape": [shapes[w] for w in which], "scaling_factor": [SD15_SCALING] * k,
                **{c: [64] * k for c in ("original_height", "original_width", "resized_height", "resized_width",
                                         "target_height", "target_width")},
                "crop_top": [0] * k, "crop_left": [0] * k, "vae": ["vae"] * k}

    parts(root, "latents", ids, STAGE_PART_ROWS, latents)


SNIPPETS = {
    "where": "from {store} import Dataset\nprint(len(Dataset({ds!r}).select_ids('rank >= 5 AND NOT has_watermark')))",
    "todo": ("from {store} import Dataset\nfrom {rows} import todo_ids, input_rows\nfrom {stats} import StatsStage\n"
             "ds, stage = Dataset({ds!r}), StatsStage()\nids = todo_ids(ds, stage)\n"
             "first = next(input_rows(ds, [stage], ids))\nprint(len(ids), len(first))"),
    # the same in the claimed units of pipelines/work.py: the to-do, then the first unit's rows
    "todo-new": ("from {store} import Dataset\nfrom {rows} import Work, as_rows\nfrom {stats} import StatsStage\n"
                 "ds, stage = Dataset({ds!r}), StatsStage()\nwork = Work(ds, [stage])\ntodo = work.todo(None, None)\n"
                 "unit = next(work.plan(todo))\nfirst = as_rows(next(work.read(unit, unit.keys, 256)))\n"
                 "print(len(todo[0]), len(first))"),
}


def command(op: str, version: str, ds: Path, zoo: Path, work: Path) -> list[str]:
    store, rows, stats = MODULES[version]
    if op == "todo" and version == "new":
        op = "todo-new"
    if op in SNIPPETS:
        return ["-c", SNIPPETS[op].format(store=store, rows=rows, stats=stats, ds=str(ds))]
    if op == "info":
        return ["-m", "curate", "info", str(ds)]
    if op == "sql":
        return ["-m", "curate", "sql", str(ds), "SELECT rank, count(*) AS images, avg(sharpness) AS sharpness, "
                "count(caption) AS captioned FROM manifest GROUP BY rank ORDER BY rank"]
    shutil.rmtree(work / "run", ignore_errors=True)
    if op == "train" and version == "new":  # a first start: the stage tables' join is made (train_again reads it)
        shutil.rmtree(ds / "cache", ignore_errors=True)
    (work / "train.toml").write_text(TRAIN_TOML)
    return ["-m", "curate", "train", str(ds), "--base", str(zoo / "sd15"), "--config", str(work / "train.toml"),
            "--output", str(work / "run"), "-q"]


def measure(args: list[str], checkout: Path | None, work: Path) -> dict:
    """Seconds and peak resident MiB of `python ARGS` (from `checkout`, else this one). GNU time
    reports the peak: a child's own counter starts at its parent's (this process is large)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if checkout:
        env["PYTHONPATH"] = str(checkout)
    peak = work / "peak"
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak), sys.executable, *args], env=env,
                          cwd=checkout or Path.cwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.decode()[-2000:]}")
    return {"s": round(seconds, 2), "peak_mib": round(int(peak.read_text().split()[-1]) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="150000,1500000")
    parser.add_argument("--ops", default="info,sql,where,todo,train,train_again")
    parser.add_argument("--compare", type=Path, help="another checkout (old main) to run the same reads from")
    parser.add_argument("--keep", type=Path, help="build the datasets here and keep them (reused when present)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root = args.keep or work
    from curate.models.tiny import write_zoo

    zoo = work / "zoo"
    write_zoo(zoo, ["sd15"])
    result = {"cpus": os.cpu_count()}
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            ds = root / f"ds-{n}"
            started = time.perf_counter()
            if not (ds / "tables").is_dir():
                build(ds, n)
            figures = {"images": n, "parts": sum(1 for _ in ds.glob("tables/*/part-*.parquet")),
                       "build_s": round(time.perf_counter() - started, 1)}
            for op in args.ops.split(","):
                versions = {"new": None, **({"old": args.compare.resolve()} if args.compare else {})}
                runs = {v: measure(command(op, v, ds, zoo, work), path, work) for v, path in versions.items()}
                figures[op] = runs["new"] if len(runs) == 1 else runs | {
                    "new_vs_old_s": round(runs["new"]["s"] / runs["old"]["s"], 3),
                    "new_vs_old_peak": round(runs["new"]["peak_mib"] / runs["old"]["peak_mib"], 3)}
                print(json.dumps({n: {op: figures[op]}}), file=sys.stderr)
            result[str(n)] = figures
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
