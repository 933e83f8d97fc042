"""`curate quality fit`: ratings -> pair model -> ELO tournament -> 10 ranks -> rank head.

Held-out check: a seeded share of the rated pairs (20% by default) is kept out of the
pair model's training; on those human judgements the pair model, the rank head
(expected rank) and, if given, the LAION aesthetic baseline are each scored by how often
they agree with the person.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from curate.models.quality_head import RANKS, save_head
from curate.pipelines.quality import model as qm
from curate.pipelines.quality.ratings import WINNER_TARGET, choose_embedder, load_embeddings, load_ratings
from curate.progress import progress_bar
from curate.store import Dataset, DatasetError


@dataclass
class FitSettings:
    embedder: str | None = None
    k: float = qm.ELO_K
    rounds: int = qm.ELO_ROUNDS
    sample: int = qm.ELO_SAMPLE
    start: float = qm.ELO_START
    pairing: str = "swiss"  # or random (bigASP)
    outcome: str = "probability"  # or win (bigASP)
    binning: str = "width"
    holdout: float = 0.2
    seed: int = 0
    where: str | None = None
    head_epochs: int = 40
    baseline: str | None = None  # LAION aesthetic predictor weights, to compare against


def recipe_settings(recipe: str | None, **given) -> FitSettings:
    """FitSettings from a recipe's ELO settings (qm.ELO_RECIPES), under what was given (None: not given)."""
    if recipe is not None and recipe not in qm.ELO_RECIPES:
        raise ValueError(f"--recipe {recipe!r} is not one of {', '.join(qm.ELO_RECIPES)}")
    values = {**(qm.ELO_RECIPES[recipe] if recipe else {}), **{k: v for k, v in given.items() if v is not None}}
    return FitSettings(**values)


def fit_quality(ds: Dataset, output: str | Path, settings: FitSettings = FitSettings(),
                show_progress: bool = True) -> dict:
    """Fit and save a quality head; returns the report (also stored in head.json)."""
    threads = torch.get_num_threads()
    # The models are small MLPs: one thread is several times faster than a pool whose
    # threads spin on each tiny matmul, and far faster on a busy machine.
    torch.set_num_threads(1)
    try:
        return _fit(ds, Path(output), settings, show_progress)
    finally:
        torch.set_num_threads(threads)


def _fit(ds: Dataset, output: Path, settings: FitSettings, show_progress: bool) -> dict:
    s = settings
    if s.binning not in ("width", "quantile"):
        raise ValueError(f"--binning {s.binning!r} must be 'width' or 'quantile'")
    if not 0 <= s.holdout < 1:
        raise ValueError(f"--holdout {s.holdout} must be in [0, 1)")
    embedder = choose_embedder(ds, s.embedder)
    ratings = load_ratings(ds)
    if ratings.num_rows == 0:
        raise DatasetError("no ratings yet: rate pairs with `curate quality rate DS` or "
                           "`curate quality import DS FILE.csv`")
    pool_ids, pool = load_embeddings(ds, embedder, ds.select_ids(s.where))
    if len(pool_ids) < 2:
        raise DatasetError(f"fewer than two images with {embedder!r} embeddings to rank")

    # rated pairs whose two images have embeddings
    left_ids, right_ids, winners = (ratings.column(c).to_pylist() for c in ("left", "right", "winner"))
    ids, vectors = load_embeddings(ds, embedder, sorted(set(left_ids) | set(right_ids)))
    row = {image_id: k for k, image_id in enumerate(ids)}
    usable = [k for k in range(len(winners)) if left_ids[k] in row and right_ids[k] in row]
    if len(usable) < 10:
        raise DatasetError(f"only {len(usable)} rated pairs have embeddings for both images; rate at least 10")
    rng = np.random.default_rng(s.seed)
    usable = rng.permutation(usable)
    n_held = int(round(len(usable) * s.holdout))
    held, train = usable[:n_held], usable[n_held:]

    def side(idx, names):
        return vectors[[row[names[k]] for k in idx]]

    sample = np.sort(rng.choice(len(pool_ids), min(s.sample, len(pool_ids)), replace=False))
    pair_epochs = qm.PAIR_EPOCHS
    with progress_bar("quality fit", pair_epochs + s.rounds + s.head_epochs, enabled=show_progress) as advance:
        net = qm.train_pair_model(side(train, left_ids), side(train, right_ids),
                                  np.array([WINNER_TARGET[winners[k]] for k in train]),
                                  seed=s.seed, epochs=pair_epochs, progress=advance)
        score = qm.scores(net, pool[sample])
        elo = qm.elo_tournament(lambda a, b: 1 / (1 + np.exp(score[b] - score[a])), len(sample),
                                rounds=s.rounds, k=s.k, seed=s.seed, start=s.start, pairing=s.pairing,
                                outcome=s.outcome, progress=advance)
        ranks, edges = qm.bin_ranks(elo, s.binning)
        head = qm.train_rank_head(pool[sample], ranks, seed=s.seed, epochs=s.head_epochs, progress=advance)

    held_winners = [winners[k] for k in held]
    report = {
        "embedder": embedder,
        "ratings": int(ratings.num_rows), "pairs_used": len(usable), "pairs_held_out": n_held,
        "pairs_without_embeddings": int(ratings.num_rows - len(usable)),
        "tournament_images": len(sample),
        "pair_model_accuracy": _acc(qm.scores(net, side(held, left_ids)), qm.scores(net, side(held, right_ids)),
                                    held_winners),
        "head_accuracy": _acc(qm.expected_rank(qm.head_probs(head, side(held, left_ids))),
                              qm.expected_rank(qm.head_probs(head, side(held, right_ids))), held_winners),
        "rank_histogram": np.bincount(ranks, minlength=RANKS).tolist(),
        "elo_edges": [round(float(e), 1) for e in edges],
        "settings": {k: v for k, v in asdict(s).items() if k != "embedder"},
    }
    if s.baseline:
        from curate.models.aesthetic import aesthetic_scores, load_aesthetic

        predictor = load_aesthetic(s.baseline)
        report["aesthetic_baseline_accuracy"] = _acc(aesthetic_scores(predictor, side(held, left_ids)),
                                                     aesthetic_scores(predictor, side(held, right_ids)), held_winners)
    save_head(output, head, embedder, fit=report)
    report["plot"] = str(plot_ranks(output / "ranks.png", elo, edges, ranks))
    return report


def _acc(left_score, right_score, winners) -> float | None:
    accuracy = qm.pair_accuracy(np.asarray(left_score), np.asarray(right_score), winners)
    return None if accuracy is None else round(accuracy, 4)


def plot_ranks(path: Path, elo: np.ndarray, edges: np.ndarray, ranks: np.ndarray) -> Path:
    """Tournament ratings with the bin edges, and images per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    top.hist(elo, bins=60, color="#4477aa")
    for edge in edges:
        top.axvline(edge, color="#cc6677", lw=0.8)
    top.set(title="ELO ratings after the tournament (lines: rank edges)", xlabel="ELO rating", ylabel="images")
    counts = np.bincount(ranks, minlength=RANKS)
    bottom.bar(range(RANKS), counts, color="#228833")
    bottom.set(title="images per rank", xlabel="rank (0 = junk, dropped from training by default)",
               ylabel="images", xticks=range(RANKS))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
