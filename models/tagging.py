"""What the taggers share: the white square padding both were trained with, and the tag rules.

Rules users expect: a threshold per tag category (WD14: general 0.35, character 0.85;
JoyTag: 0.4 for all), the rating kept apart in its own column (the most probable rating
tag), and tag names kept as the model spells them (formatting is the trainer's job).
"""
from __future__ import annotations

import numpy as np

from curate.images import resize

# Danbooru categories as WD14's selected_tags.csv numbers them.
GENERAL, CHARACTER, RATING = 0, 4, 9


def pad_square(pixels: np.ndarray) -> np.ndarray:
    """Centre uint8 HWC pixels on a white square of the longer side (as WD14 and JoyTag were trained)."""
    h, w = pixels.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


def square_resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """The white square, bicubic to size x size (uint8 RGB pixels)."""
    return resize(pad_square(pixels), (size, size))


def select_tags(scores: np.ndarray, names: list[str], categories: np.ndarray,
                thresholds: dict[int, float]) -> dict:
    """One image's row: tags over their category's threshold, most confident first, and the rating.

    Categories missing from `thresholds` (e.g. copyright, artist, meta when not asked for)
    are left out; rating tags never appear among the tags.
    """
    return {k: v[0] for k, v in tag_columns(scores[None], names, categories, thresholds).items()}


def tag_columns(probs: np.ndarray, names: list[str], categories: np.ndarray, thresholds: dict[int, float]) -> dict:
    """A batch's `tags` table columns: select_tags for every row of probabilities."""
    limits = np.full(len(names), np.inf, np.float32)  # each tag's threshold; never kept if not asked for
    for category, threshold in thresholds.items():
        limits[categories == category] = threshold
    out = {"tags": [], "tag_scores": [], "rating": [], "rating_score": []}
    ratings = np.flatnonzero(categories == RATING)
    for scores, keep in zip(probs, probs > limits):
        kept = np.flatnonzero(keep)  # a few dozen of WD14's ~10,000 tags: sort only those
        order = kept[np.argsort(-scores[kept], kind="stable")]
        out["tags"].append([names[i] for i in order])
        out["tag_scores"].append(scores[order].astype(np.float32))
        best = int(ratings[np.argmax(scores[ratings])]) if len(ratings) else None
        out["rating"].append(None if best is None else names[best])
        out["rating_score"].append(None if best is None else float(scores[best]))
    return out
