"""A dataset of real images with a row in every stage table, for the view and report tests.

The stage rows are written straight into the tables (following curate/schema.py), so each
test knows exactly what the page must show: a watermark box at a known place, tags from
two taggers (one failing on one image), captions, ranks, buckets, latents with the crop
the encoder would take, and two images whose perceptual hashes are 2 bits apart.
"""
from __future__ import annotations

from datetime import timedelta

import numpy as np
from PIL import Image

from curate.buckets import plan_crop
from curate.store import Dataset, now
from tests.conftest import encode_image, make_image

BOX = {"x0": 0.25, "y0": 0.5, "x1": 0.75, "y1": 0.9, "score": 0.8}  # the forced watermark box
WORDS = ["smile", "long_hair", "outdoors", "sky", "tree", "portrait", "hat", "water", "city", "night", "grass"]
LATENT_BUCKET = (64, 64)  # every latent in one bucket, so a dry run has full batches


def write_images(folder, n: int = 10) -> None:
    """n photos-like images of varied sizes, a flat grey one (0) for pixel checks, and a broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(400, 300), (300, 400), (256, 256), (480, 240), (240, 480), (320, 320), (512, 384), (384, 512),
             (360, 240), (240, 360), (300, 200), (200, 300)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image = Image.new("RGB", (w, h), (128, 128, 128)) if i == 0 else make_image(w, h, seed=i)
        (folder / f"img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}").write_bytes(
            encode_image(image, "PNG" if i % 3 == 0 else "JPEG"))
    (folder / "broken.jpg").write_bytes(b"not an image")


def add_stage_rows(ds: Dataset, seed: int = 0) -> dict:
    """Rows in every stage table for every ok image; returns what was written, by image id."""
    rng = np.random.default_rng(seed)
    images = ds.query("SELECT image_id, min(source) AS source, any_value(width) AS width, "
                      "any_value(height) AS height FROM images WHERE status = 'ok' GROUP BY image_id "
                      "ORDER BY source").to_pylist()
    ids = [r["image_id"] for r in images]
    n, t = len(ids), now()

    def stage(model: str, **columns) -> dict:
        return {"image_id": ids, "model": [model] * n, "status": ["ok"] * n, "error": [None] * n,
                "message": [None] * n, "created_at": [t] * n, **columns}

    hashes = [int(h) for h in rng.integers(0, 2**63, n)]
    hashes[2] = hashes[1] ^ 0b101  # images 1 and 2: near duplicates, 2 bits apart
    ds.write_part("stats", stage("stats-v1", phash=hashes, brightness=rng.uniform(0, 1, n).tolist(),
                                 sharpness=rng.uniform(0, 500, n).tolist(), colorfulness=rng.uniform(0, 80, n).tolist(),
                                 entropy=rng.uniform(3, 8, n).tolist()))
    tags = [[WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(2, 7)), replace=False)] for _ in range(n)]
    ds.write_part("tags", stage("wd14:tiny@general=0.35,character=0.85", tags=tags,
                                tag_scores=[rng.uniform(0.35, 1, len(x)).round(3).tolist() for x in tags],
                                rating=["general"] * n, rating_score=[0.9] * n))
    joytag = stage("joytag:tiny@threshold=0.4", tags=[x[:2] for x in tags],
                   tag_scores=[[0.5] * len(x[:2]) for x in tags], rating=[None] * n, rating_score=[None] * n)
    # older than wd14's rows, so the manifest takes wd14's; it failed on image 0
    joytag.update(created_at=[t - timedelta(seconds=1)] * n, status=["error"] + ["ok"] * (n - 1),
                  error=["process_failed"] + [None] * (n - 1), message=["the tagger failed here"] + [None] * (n - 1))
    ds.write_part("tags", joytag)
    ds.write_part("captions", stage("llava:tiny@prompt=0123456789ab,max_new_tokens=160", prompt=["Describe."] * n,
                                    caption=[f"A picture of {' and '.join(x[:2])}. It is number {i}." for i, x in
                                             enumerate(tags)], raw=[None] * n))
    ranks = [i % 10 for i in range(n)]
    ds.write_part("quality", stage("quality:head#0000", rank=ranks,
                                   probs=[np.eye(10)[r].round(2).tolist() for r in ranks]))
    marked = [i % 3 == 0 for i in range(n)]
    ds.write_part("watermarks", stage("owlv2:tiny@query=a watermark,threshold=0.1",
                                      score=[0.8 if m else 0.02 for m in marked], has_watermark=marked,
                                      boxes=[[BOX] if m else [] for m in marked]))
    ds.write_part("buckets", stage("sd15", bucket_width=[64] * n, bucket_height=[64] * n))
    crops = [plan_crop(r["width"], r["height"], LATENT_BUCKET, "random", i) for i, r in enumerate(images)]
    latents = [rng.standard_normal((4, 8, 8)).astype(np.float16).tobytes() for _ in range(n)]
    ds.write_part("latents", stage(
        "vae:tiny@dtype=fp32,set=sd15,crop=random,seed=0,upscale=false,distribution=false",
        latent=latents, shape=[[4, 8, 8]] * n, scaling_factor=[0.13025] * n,
        original_height=[r["height"] for r in images], original_width=[r["width"] for r in images],
        resized_height=[c.resized_height for c in crops], resized_width=[c.resized_width for c in crops],
        crop_top=[c.crop_top for c in crops], crop_left=[c.crop_left for c in crops],
        target_height=[c.target_height for c in crops], target_width=[c.target_width for c in crops],
        mean=[None] * n, logvar=[None] * n, vae=["tiny@fp32"] * n, shift_factor=[None] * n,
        flip_latent=[None] * n, flip_mean=[None] * n, flip_logvar=[None] * n, flip_crop_left=[None] * n))
    return {"ids": ids, "sources": [r["source"] for r in images], "tags": tags, "ranks": ranks, "marked": marked,
            "crops": crops, "sizes": [(r["width"], r["height"]) for r in images]}

