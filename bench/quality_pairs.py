"""How many ratings the quality head needs: the rating page's pair choice against random pairs.

Synthetic data with a hidden true quality (pipelines/quality/simulate.py): unit-norm
embeddings 512 wide whose variance decays over components as CLIP's does (`--decay 1`;
0 is isotropic, much harder), quality a known nonlinear function of them plus noise they
cannot explain; a
simulated person who is wrong 10% of the time. For each strategy and seed, ratings are
collected one at a time (the chooser learning as it goes), and at each checkpoint the real
pair model is trained on the ratings so far and scored on 4,000 fresh random pairs judged by
the hidden quality itself. Then `fit` runs end to end on 2,000 ratings of each strategy and
the Spearman correlation of the head's ranks with the hidden quality is measured.

    python bench/quality_pairs.py [--dim 512] [--decay 1] [--images 5000] [--seeds 2]   # prints JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.pipelines.quality import model as qm  # noqa: E402
from curate.pipelines.quality.pairs import PairChooser  # noqa: E402
from curate.pipelines.quality.ratings import load_embeddings  # noqa: E402
from curate.pipelines.quality.simulate import SimulatedRater, simulate_ratings, write_synthetic_dataset  # noqa: E402
from curate.store import Dataset, now  # noqa: E402

CHECKPOINTS = [100, 250, 500, 750, 1000, 1500, 2000, 3000]
TARGETS = [0.70, 0.75, 0.80, 0.825, 0.85]


def accuracy_curve(emb, quality, ids, strategy, seed, test_pairs):
    chooser = PairChooser(ids, emb, seed=seed, strategy=strategy)
    judgements = simulate_ratings(chooser, SimulatedRater(quality, ids, 0.1, seed=seed + 100), max(CHECKPOINTS))
    a, b, y = (np.array(c) for c in zip(*chooser.judgements))
    curve = {}
    for n in CHECKPOINTS:
        net = qm.train_pair_model(emb[a[:n]], emb[b[:n]], y[:n], seed=seed)
        s = qm.scores(net, emb)
        truth = quality[test_pairs[:, 0]] > quality[test_pairs[:, 1]]
        curve[n] = float(np.mean((s[test_pairs[:, 0]] > s[test_pairs[:, 1]]) == truth))
    return curve, judgements


def needed(curve: dict[int, float], target: float) -> int | None:
    return next((n for n in CHECKPOINTS if curve[n] >= target), None)


def fit_spearman(n_images, dim, decay, judgements, quality_seed):
    from scipy.stats import spearmanr

    from curate.pipelines.quality.fit import FitSettings, fit_quality

    with tempfile.TemporaryDirectory() as tmp:
        ds = Dataset(Path(tmp) / "ds", create=True)
        ids, quality = write_synthetic_dataset(ds, n_images, dim, seed=quality_seed, decay=decay)
        left, right, winner = zip(*judgements[:2000])
        ds.write_part("ratings", {"left": left, "right": right, "winner": winner, "rater": ["sim"] * len(left),
                                  "created_at": [now()] * len(left)})
        report = fit_quality(ds, Path(tmp) / "head", FitSettings(), show_progress=False)
        from curate.models.quality_head import load_head

        head, _ = load_head(Path(tmp) / "head")
        found, vectors = load_embeddings(ds, "synthetic-clip")
        truth = dict(zip(ids, quality))
        probs = qm.head_probs(head, vectors)
        hidden = [truth[i] for i in found]
        return {"spearman_rank": round(float(spearmanr(probs.argmax(1), hidden)[0]), 3),
                "spearman_expected_rank": round(float(spearmanr(qm.expected_rank(probs), hidden)[0]), 3),
                "pair_model_accuracy_held_out": report["pair_model_accuracy"],
                "head_accuracy_held_out": report["head_accuracy"], "rank_histogram": report["rank_histogram"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the same embeddings and ids fit will see
        ds = Dataset(Path(tmp) / "ds", create=True)
        ids, quality = write_synthetic_dataset(ds, args.images, args.dim, seed=1, decay=args.decay)
        found, emb = load_embeddings(ds, "synthetic-clip")
    quality = np.array([dict(zip(ids, quality))[i] for i in found])
    test_pairs = np.random.default_rng(999).choice(len(found), (4000, 2))
    results, first_judgements = {}, {}
    for strategy in ("uncertain", "random"):
        curves = []
        for seed in range(args.seeds):
            curve, judgements = accuracy_curve(emb, quality, found, strategy, seed, test_pairs)
            curves.append(curve)
            first_judgements.setdefault(strategy, judgements)
        mean = {n: round(float(np.mean([c[n] for c in curves])), 4) for n in CHECKPOINTS}
        results[strategy] = {"accuracy_by_ratings": mean,
                             "ratings_needed": {str(t): needed(mean, t) for t in TARGETS}}
    for strategy in results:
        results[strategy]["fit_with_2000_ratings"] = fit_spearman(args.images, args.dim, args.decay,
                                                                  first_judgements[strategy], 1)
    print(json.dumps({"benchmark": "quality_pairs", "images": args.images, "embedding_dim": args.dim,
                      "variance_decay": args.decay,
                      "rater_error": 0.1, "seeds": args.seeds, "test_pairs": len(test_pairs),
                      "accuracy": "pair model vs hidden quality on fresh random pairs (noise-free truth)",
                      **results, "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
