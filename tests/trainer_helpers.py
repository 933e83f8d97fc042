"""Trainer test helpers: a dataset with latents, tags, captions, ranks and watermarks written
straight into the tables (following curate/schema.py), and a Ray Train worker loop that
saves one step's gradients (it lives here, in an importable module, so workers can load it)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from curate.storage import LOCATOR_COLUMNS
from curate.store import Dataset, now

WORDS = ["smile", "long_hair", "red_eyes", "outdoors", "sky", "cloud", "tree", "portrait", "blue_dress", "hat",
         "looking_at_viewer", "sitting", "standing", "water", "city", "night", "sun", "grass", "flower", "book"]


def image_id(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def make_latent_dataset(root: Path, n: int = 8, buckets: list[tuple[int, int]] = ((8, 8),), ranks=None,
                        seed: int = 0, vae: str = "tiny-vae", latent_parts: int = 1,
                        rows_per_group: int | None = None, moments: bool = False, scaling_factor: float = 0.13025,
                        flip: bool = False) -> Dataset:
    """n images; image i gets bucket i % len(buckets) (latent h, w), tags, a caption, a rank and
    (every third) a watermark box. Latents are smooth random fields, so a UNet can fit them.
    Latents are written in `latent_parts` parts, of `rows_per_group` rows per row group if given
    (the writer sizes groups by bytes, ~32 MiB, which small test latents never reach). With
    `moments`, each latent is stored as its own mean, with a log-variance of log(0.01). With `flip`,
    the mirrored crop's latent is the latent mirrored, with a crop left of 0."""
    rng = np.random.default_rng(seed)
    ds = Dataset(root, create=True)
    ids = [image_id(i) for i in range(n)]
    t = now()
    ds.write_part("images", {"image_id": ids, "source": [f"img{i}.jpg" for i in range(n)], "bytes": [b""] * n,
                             "size_bytes": [0] * n, "width": [640] * n, "height": [480] * n, "format": ["JPEG"] * n,
                             "mode": ["RGB"] * n, "animated": [False] * n, "status": ["ok"] * n, "error": [None] * n,
                             "message": [None] * n, "created_at": [t] * n,
                             **dict.fromkeys(LOCATOR_COLUMNS, [None] * n)})
    stage = {"image_id": ids, "status": ["ok"] * n, "error": [None] * n, "message": [None] * n, "created_at": [t] * n}
    latents, shapes, geometry = [], [], []
    for i in range(n):
        h, w = buckets[i % len(buckets)]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        lat = np.stack([np.sin(xx * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(1, 4)) * 3
                        for _ in range(4)]).astype(np.float16)
        latents.append(lat.tobytes())
        shapes.append([4, h, w])
        geometry.append((h * 8, w * 8))
    columns = stage | {
        "model": [vae] * n, "latent": latents, "shape": shapes, "scaling_factor": [scaling_factor] * n,
        "original_height": [gh * 2 + 3 for gh, _ in geometry], "original_width": [gw * 2 + 5 for _, gw in geometry],
        "resized_height": [gh + 8 for gh, _ in geometry], "resized_width": [gw for _, gw in geometry],
        "crop_top": [4] * n, "crop_left": [0] * n,
        "target_height": [gh for gh, _ in geometry], "target_width": [gw for _, gw in geometry],
        "mean": latents if moments else [None] * n,
        "logvar": ([np.full_like(np.frombuffer(b, np.float16), np.log(0.01)).tobytes() for b in latents]
                   if moments else [None] * n),
        "vae": [vae] * n, "shift_factor": [None] * n,
        "flip_latent": [np.ascontiguousarray(np.frombuffer(b, np.float16).reshape(s)[:, :, ::-1]).tobytes()
                        for b, s in zip(latents, shapes)] if flip else [None] * n,
        "flip_mean": [None] * n, "flip_logvar": [None] * n, "flip_crop_left": [0] * n if flip else [None] * n}
    bounds = np.linspace(0, n, latent_parts + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = ds.write_part("latents", {k: v[lo:hi] for k, v in columns.items()})
        if part is not None and rows_per_group:
            pq.write_table(pq.read_table(part), part, row_group_size=rows_per_group)
    tags = [[WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(3, 15)), replace=False)] for _ in range(n)]
    ds.write_part("tags", stage | {"model": ["wd14"] * n, "tags": tags, "tag_scores": [[0.9] * len(x) for x in tags],
                                   "rating": ["general"] * n, "rating_score": [0.9] * n})
    ds.write_part("captions", stage | {"model": ["vlm"] * n, "prompt": ["describe"] * n, "raw": [None] * n,
                                       "caption": [f"A picture number {i}. It has {len(tags[i])} things in it."
                                                   for i in range(n)]})
    ranks = ranks if ranks is not None else [int(r) for r in rng.integers(1, 10, n)]
    ds.write_part("quality", stage | {"model": ["head"] * n, "rank": ranks, "probs": [[0.1] * 10] * n})
    marked = [i % 3 == 0 for i in range(n)]
    ds.write_part("watermarks", stage | {
        "model": ["owlv2"] * n, "score": [0.9 if m else 0.01 for m in marked], "has_watermark": marked,
        "boxes": [[{"x0": 0.5, "y0": 0.5, "x1": 1.0, "y1": 1.0, "score": 0.9}] if m else [] for m in marked]})
    return ds


def retag(ds: Dataset, ids: list[str], tags: list[list[str]]) -> None:
    """Give these images new tags, as a newer tagger's rows (the manifest takes the latest)."""
    n = len(ids)
    ds.write_part("tags", {"image_id": ids, "model": ["wd14-retagged"] * n, "tags": tags,
                           "tag_scores": [[0.9] * len(t) for t in tags], "rating": ["general"] * n,
                           "rating_score": [0.9] * n, "status": ["ok"] * n, "error": [None] * n, "message": [None] * n,
                           "created_at": [now()] * n})


def probe_gradients(settings: dict) -> None:
    """A Ray Train worker loop: one micro-step, gradients averaged over workers, saved by rank 0;
    then the ordinary training run."""
    import ray.train

    from curate.trainer.config import config_from_dict
    from curate.trainer.train import Trainer

    context = ray.train.get_context()
    trainer = Trainer(settings["dataset"], settings["base"], config_from_dict(settings["config"]),
                      rank=context.get_world_rank(), world=context.get_world_size())
    trainer.micro_step(0).backward()
    trainer.sync_gradients()
    if context.get_world_rank() == 0:
        torch.save({n: p.grad for n, p in trainer.models.unet.named_parameters()}, settings["grads"])
    trainer.optimizer.zero_grad(set_to_none=True)
    ray.train.report({"steps": trainer.run(show_progress=False)["steps"]})
