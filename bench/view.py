"""Benchmark of `curate view` and `curate report` on a large synthetic dataset; prints JSON.

The dataset is written straight into the tables (no models run): N images (tiny JPEGs,
unique bytes), in parts of 2,048 rows as the executor writes them, with stats, tags from
two taggers (40 of 2,000 tags each), captions, ranks, watermark boxes on 10%, buckets and
small latents. Then, through the real HTTP server on loopback:

- first start: opening the dataset and joining the stage results into DS/cache (once per
  set of parts); start: the same with the join cached, until the server listens;
- first grid: start plus the first page's JSON (120 images, sorted by image_id);
- thumbnails: the first page's 120 thumbnails, made from the images table (cold) and
  again (cached in DS/thumbs), fetched 6 at a time as a browser does;
- filtered grid: a filter over rank, watermark and tags, sorted by sharpness;
- panel: everything about one image;
- an edit over the filter (thousands of images) and the grid after it;
and the report's generation time, with the trainer's dry run (tiny SDXL tokenizer) and without.

    python bench/view.py [--images 100000]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from hashlib import sha256
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.store import PART_ROWS, Dataset, now  # noqa: E402

FILTER = "rank >= 5 AND NOT has_watermark AND list_contains(tags, 'tag_7')"


def build(root: Path, n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset(root, create=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    jpeg, t = buf.getvalue(), now()
    vocab = np.array([f"tag_{i}" for i in range(2000)])
    for lo in range(0, n, PART_ROWS):
        k = min(PART_ROWS, n - lo)
        data = [jpeg + i.to_bytes(8, "little") for i in range(lo, lo + k)]  # bytes after EOI: decodes the same
        ids = [sha256(d).hexdigest() for d in data]
        w, h = rng.integers(512, 4000, k), rng.integers(512, 4000, k)
        ds.write_part("images", {"image_id": ids, "source": [f"/photos/{i:07d}.jpg" for i in range(lo, lo + k)],
                                 "bytes": data, "size_bytes": [len(d) for d in data], "width": w.tolist(),
                                 "height": h.tolist(), "format": ["JPEG"] * k, "mode": ["RGB"] * k,
                                 "animated": [False] * k, "status": ["ok"] * k, "error": [None] * k,
                                 "message": [None] * k, "created_at": [t] * k})

        def stage(model, when=t, **columns):
            return {"image_id": ids, "model": [model] * k, "status": ["ok"] * k, "error": [None] * k,
                    "message": [None] * k, "created_at": [when] * k, **columns}

        ds.write_part("stats", stage("stats-v1", phash=[int(x) for x in rng.integers(0, 2**63, k)],
                                     brightness=rng.random(k).tolist(), sharpness=(rng.random(k) * 500).tolist(),
                                     colorfulness=(rng.random(k) * 80).tolist(), entropy=(rng.random(k) * 8).tolist()))
        for model, when in (("joytag:x@threshold=0.4", t - timedelta(seconds=1)), ("wd14:x@general=0.35", t)):
            tags = [vocab[np.minimum(rng.zipf(1.3, 40), 2000) - 1].tolist() for _ in range(k)]
            ds.write_part("tags", stage(model, when, tags=tags, tag_scores=[[0.5] * len(x) for x in tags],
                                        rating=["general"] * k, rating_score=[0.9] * k))
        ds.write_part("captions", stage("llava:x", prompt=["Describe."] * k, raw=[None] * k,
                                        caption=[" ".join(vocab[rng.integers(0, 2000, rng.integers(8, 60))])
                                                 + "." for _ in range(k)]))
        ranks = rng.integers(0, 10, k)
        ds.write_part("quality", stage("quality:head#0", rank=ranks.tolist(), probs=[[0.1] * 10] * k))
        marked = rng.random(k) < 0.1
        ds.write_part("watermarks", stage("owlv2:x", score=np.where(marked, 0.6, 0.01).tolist(),
                                          has_watermark=marked.tolist(),
                                          boxes=[[{"x0": 0.1, "y0": 0.8, "x1": 0.4, "y1": 0.95, "score": 0.6}] if m
                                                 else [] for m in marked]))
        ds.write_part("buckets", stage("sdxl", bucket_width=[1024] * k, bucket_height=[1024] * k))
        ds.write_part("latents", stage("vae:x", latent=[rng.standard_normal(256).astype(np.float16).tobytes()] * k,
                                       shape=[[4, 8, 8]] * k, scaling_factor=[0.13025] * k,
                                       original_height=h.tolist(), original_width=w.tolist(),
                                       resized_height=[1024] * k, resized_width=[1024] * k, crop_top=[0] * k,
                                       crop_left=[0] * k, target_height=[1024] * k, target_width=[1024] * k,
                                       mean=[None] * k, logvar=[None] * k, vae=["x@fp32"] * k,
                                       shift_factor=[None] * k, flip_latent=[None] * k, flip_mean=[None] * k,
                                       flip_logvar=[None] * k, flip_crop_left=[None] * k))
    return ds


def get(port: int, path: str, **query) -> tuple[float, bytes]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path + ("?" + urlencode(query) if query else ""))
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200, (path, response.status, body[:200])
    return time.perf_counter() - started, body


def post(port: int, path: str, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    value = json.loads(response.read())
    conn.close()
    assert response.status == 200, value
    return time.perf_counter() - started, value


def thumbnails(port: int, ids: list[str]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:  # a browser's connections per host
        list(pool.map(lambda i: get(port, f"/thumb/{i}"), ids))
    return time.perf_counter() - started


def note(out: dict) -> None:
    """Each figure on stderr as it comes (a long run shows where it is), with the peak memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{json.dumps(out)}  peak {peak} MiB", file=sys.stderr, flush=True)


def bench(args) -> dict:
    from curate.cli.report import write_report
    from curate.cli.view import serve
    from curate.cli.view_data import ViewData
    from curate.models.tiny import write_zoo
    from curate.trainer.config import load_config

    out = {"images": args.images}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ds = build(Path(tmp) / "ds", args.images)
        out["build_dataset_s"] = round(time.perf_counter() - started, 1)
        note(out)

        started = time.perf_counter()
        ViewData(Dataset(ds.root))
        out["first_start_s"] = round(time.perf_counter() - started, 3)  # joins the stage tables into DS/cache
        started = time.perf_counter()
        server = serve(ViewData(Dataset(ds.root)), None, "127.0.0.1", 0)
        out["start_s"] = round(time.perf_counter() - started, 3)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        seconds, body = get(port, "/api/grid", limit=120)
        first = json.loads(body)
        out["first_grid_s"] = round(out["start_s"] + seconds, 3)
        out["first_grid_query_s"] = round(seconds, 3)
        ids = [r["image_id"] for r in first["rows"]]
        out["thumbnails_120_cold_s"] = round(thumbnails(port, ids), 3)
        out["thumbnails_120_cached_s"] = round(thumbnails(port, ids), 3)
        note(out)
        seconds, body = get(port, "/api/grid", where=FILTER, order="sharpness", desc="1", limit=120)
        out["filtered_grid_s"] = round(seconds, 3)
        out["filtered_images"] = json.loads(body)["total"]
        out["panel_s"] = round(get(port, f"/api/image/{ids[0]}")[0], 3)
        seconds, edit = post(port, "/api/edit", {"action": "add_tag", "value": "bench_tag", "where": FILTER})
        out["bulk_edit_s"], out["bulk_edit_images"] = round(seconds, 3), edit["images"]
        out["grid_after_edit_s"] = round(get(port, "/api/grid", where="list_contains(tags, 'bench_tag')",
                                             limit=120)[0], 3)
        server.shutdown()
        note(out)

        started = time.perf_counter()
        write_report(ds, Path(tmp) / "plain.html", load_config(None))
        out["report_s"] = round(time.perf_counter() - started, 1)
        note(out)
        base = str(write_zoo(Path(tmp) / "zoo", ["sdxl"])["sdxl"])
        started = time.perf_counter()
        summary = write_report(ds, Path(tmp) / "report.html", load_config(None), base)
        out["report_with_dry_run_s"] = round(time.perf_counter() - started, 1)
        out["report_kib"] = summary["size (KiB)"]
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    print(json.dumps(bench(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
