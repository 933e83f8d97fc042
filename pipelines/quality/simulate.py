"""Synthetic data with a hidden true quality, and a simulated rater, for tests, the
benchmark and the demo: they measure whether the recipe recovers a ranking we know."""
from __future__ import annotations

import numpy as np

from curate.pipelines.quality.pairs import PairChooser
from curate.storage import LOCATOR_COLUMNS


def synthetic_embeddings(n: int, dim: int = 64, seed: int = 0, noise: float = 0.3,
                         decay: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings and their hidden quality: a known nonlinear function of two
    directions plus noise the embedding cannot explain (as real quality has).

    decay > 0 gives component k a variance of (k+1)**-decay, as real CLIP embeddings
    concentrate their variance in a few dozen directions (0: isotropic)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * (np.arange(1, dim + 1) ** (-decay / 2))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    u, v = rng.normal(size=(2, dim))
    z1, z2 = x @ u, x @ v
    z1, z2 = (z1 - z1.mean()) / z1.std(), (z2 - z2.mean()) / z2.std()
    quality = z1 + 0.5 * np.sin(2 * z2) + noise * rng.normal(size=n)
    return x.astype(np.float32), quality


class SimulatedRater:
    """Prefers the image of higher hidden quality, but is wrong `error` of the time."""

    def __init__(self, quality: np.ndarray, ids: list[str], error: float = 0.1, seed: int = 0):
        self.quality = dict(zip(ids, quality))
        self.error = error
        self.rng = np.random.default_rng(seed)

    def judge(self, left: str, right: str) -> str:
        better = "left" if self.quality[left] > self.quality[right] else "right"
        if self.rng.random() < self.error:
            return "right" if better == "left" else "left"
        return better


def simulate_ratings(chooser: PairChooser, rater: SimulatedRater, n: int) -> list[tuple[str, str, str]]:
    """n judgements: the chooser picks each pair, the rater judges it, the chooser learns."""
    out = []
    for _ in range(n):
        left, right = chooser.next_pair()
        winner = rater.judge(left, right)
        chooser.add(left, right, winner)
        out.append((left, right, winner))
    return out


def write_synthetic_dataset(ds, n: int, dim: int = 64, seed: int = 0, embedder: str = "synthetic-clip",
                            decay: float = 0.0):
    """A dataset of n ok images (rows only, no pixels) with synthetic embeddings; returns
    (ids, hidden quality). Lets fit be judged against a ranking we know."""
    import hashlib

    from curate.store import now

    embeddings, quality = synthetic_embeddings(n, dim, seed, decay=decay)
    ids = [hashlib.sha256(f"synthetic-{seed}-{i}".encode()).hexdigest() for i in range(n)]
    stamp = now()
    ds.write_part("images", {"image_id": ids, "source": [f"/synthetic/{i:06d}.jpg" for i in range(n)],
                             "bytes": [None] * n, "size_bytes": [0] * n, "width": [512] * n, "height": [512] * n,
                             "format": ["JPEG"] * n, "mode": ["RGB"] * n, "animated": [False] * n,
                             "status": ["ok"] * n, "error": [None] * n, "message": [None] * n,
                             "created_at": [stamp] * n, **dict.fromkeys(LOCATOR_COLUMNS, [None] * n)})
    ds.write_part("embeddings", {"image_id": ids, "model": [embedder] * n, "status": ["ok"] * n, "error": [None] * n,
                                 "message": [None] * n, "created_at": [stamp] * n,
                                 "embedding": [row.astype(np.float16).tolist() for row in embeddings]})
    return ids, quality


def demo_quality_loop(ds, clip_dir, head_dir, csv_path, n_ratings: int = 400, seed: int = 0) -> dict:
    """`curate demo`'s quality step: the whole loop with a simulated person who prefers
    brighter images (the stats table's brightness; the tiny zoo's random-weight CLIP sees
    brightness, not finer qualities) and is wrong 10% of the time.

    Embed with CLIP (if not done), pick pairs as the rating page would, write the
    judgements to a CSV and import it, fit the head, and rank every image with it.
    """
    from scipy.stats import spearmanr

    from curate.models.clip import Clip
    from curate.pipelines.quality.fit import FitSettings, fit_quality
    from curate.pipelines.quality.ratings import import_csv, load_embeddings
    from curate.pipelines.score import score

    ids = ds.select_ids()
    embedder = Clip(str(clip_dir)).model_value()
    found, vectors = load_embeddings(ds, embedder, ids)
    if len(found) < len(ids):
        score(ds, clip=str(clip_dir), show_progress=False)
        found, vectors = load_embeddings(ds, embedder, ids)
    rows = ds.query("SELECT image_id, brightness FROM manifest").to_pydict()
    brightness = dict(zip(rows["image_id"], rows["brightness"]))
    rater = SimulatedRater(np.array([brightness[i] for i in found]), found, error=0.1, seed=seed)
    judgements = simulate_ratings(PairChooser(found, vectors, seed=seed), rater, n_ratings)
    csv_path.write_text("left,right,winner\n" + "".join(f"{a},{b},{w}\n" for a, b, w in judgements))
    imported = import_csv(ds, csv_path, rater="simulated")
    report = fit_quality(ds, head_dir, FitSettings(embedder=embedder, seed=seed), show_progress=False)
    summary = score(ds, quality=str(head_dir), show_progress=False)[-1]
    ranked = ds.query("SELECT rank, brightness FROM manifest WHERE rank IS NOT NULL").to_pydict()
    return {"judgements imported": imported["imported"], "pair model held-out accuracy": report["pair_model_accuracy"],
            "head held-out accuracy": report["head_accuracy"], "images ranked": summary.ok,
            "Spearman(rank, brightness)": round(float(spearmanr(ranked["rank"], ranked["brightness"])[0]), 3),
            "rank histogram (tournament)": report["rank_histogram"], "head": str(head_dir)}
