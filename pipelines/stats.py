"""`curate hash`: cheap per-image statistics, and near-duplicate search on the hashes.

phash is the classic DCT perceptual hash: 32x32 greyscale, 2-D DCT, the 8x8 lowest
frequencies (DC included) compared with their median give 64 bits. Two images whose
hashes differ in a few bits look alike.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

from curate.pipelines.stage import Stage

STATS_SIDE = 256  # statistics are computed on a copy at most this size


class StatsStage(Stage):
    table = "stats"
    decode_min_side = 64
    batch_size = 64

    def model_key(self) -> str:
        return "stats-v1"

    def prepare(self, row):
        img = row["image"].image
        small = img.copy()
        small.thumbnail((STATS_SIDE, STATS_SIDE), Image.Resampling.BILINEAR)
        rgb = np.asarray(small, dtype=np.float32)
        grey = np.asarray(small.convert("L"), dtype=np.float32)
        return {
            "phash": phash(img),
            "brightness": float(grey.mean() / 255.0),
            "sharpness": laplacian_variance(grey),
            "colorfulness": colorfulness(rgb),
            "entropy": entropy(grey),
        }

    def process(self, batch):
        return {k: list(batch[k]) for k in ("phash", "brightness", "sharpness", "colorfulness", "entropy")}


def phash(img: Image.Image) -> int:
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low for blurry images."""
    if min(grey.shape) < 3:
        return 0.0
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(lap.var())


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003): 0 for grey images, ~100+ for very colourful ones."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def entropy(grey: np.ndarray) -> float:
    """Shannon entropy of the 8-bit grey histogram, in bits (0..8)."""
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())
