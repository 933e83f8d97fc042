"""Which two images the rating page shows next.

Strategy (coverage first, then uncertainty): both images come from the least-shown so
far (ties broken at random), so every image is rated before any is rated twice and the
pair model sees as much of the embedding space as possible. One is drawn at random; its
opponent is, among a random handful of such candidates, the one the current
model is least sure about: the nearest in current score. Close pairs carry the most information about where quality
changes; drawing from a handful, not from everyone, keeps pairs varied and stops a 10%
rater error rate from dominating on near-identical images. Which one goes on the left is
then decided by a coin, so a rater's side bias averages out.

The current score comes from a linear Bradley-Terry model on the embeddings (refit as
judgements arrive), so even never-rated images have a score; without embeddings it is
each image's online ELO rating. `bench/quality_pairs.py` measures this against random
pairs in a simulation.
"""
from __future__ import annotations

import numpy as np

from curate.pipelines.quality.ratings import WINNER_TARGET

MIN_JUDGEMENTS_TO_FIT = 20


class PairChooser:
    def __init__(self, ids: list[str], embeddings: np.ndarray | None = None, *, seed: int = 0,
                 candidates: int = 16, strategy: str = "uncertain"):
        if len(ids) < 2:
            raise ValueError(f"need at least two images to compare, found {len(ids)}")
        if strategy not in ("uncertain", "random"):
            raise ValueError(f"strategy {strategy!r} must be 'uncertain' or 'random'")
        self.ids = list(ids)
        self.index = {image_id: k for k, image_id in enumerate(self.ids)}
        self.features = None
        if embeddings is not None:
            unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
            self.features = (unit * np.sqrt(unit.shape[1])).astype(np.float64)
        self.rng = np.random.default_rng(seed)
        self.candidates, self.strategy = candidates, strategy
        self.judgements: list[tuple[int, int, float]] = []
        self.shown = np.zeros(len(ids))
        self.score = np.zeros(len(ids))
        self.fitted_at = 0
        self.offered: set[tuple[int, int]] = set()

    # ---- feeding judgements ------------------------------------------------------
    def add(self, left: str, right: str, winner: str) -> None:
        """A judgement (from this page, an import, or a simulation). Unknown ids are ignored."""
        a, b = self.index.get(left), self.index.get(right)
        if a is None or b is None or a == b:
            return
        self.judgements.append((a, b, WINNER_TARGET[winner]))
        self.shown[[a, b]] += 1
        self.offered.add((min(a, b), max(a, b)))
        if self.features is None:
            self._elo_update(a, b, WINNER_TARGET[winner])

    def skip(self, left: str, right: str) -> None:
        a, b = self.index[left], self.index[right]
        self.shown[[a, b]] += 1
        self.offered.add((min(a, b), max(a, b)))

    def undo(self, left: str, right: str) -> None:
        """Forget the latest judgement of this pair (the page's undo)."""
        a, b = self.index[left], self.index[right]
        for k in range(len(self.judgements) - 1, -1, -1):
            if self.judgements[k][:2] == (a, b):
                del self.judgements[k]
                self.shown[[a, b]] -= 1
                self.offered.discard((min(a, b), max(a, b)))
                break
        if self.features is None:  # replay: ELO depends on the order
            self.score[:] = 0
            for a, b, y in self.judgements:
                self._elo_update(a, b, y)
        else:
            self.fitted_at = 0

    # ---- choosing ----------------------------------------------------------------
    def next_pair(self) -> tuple[str, str]:
        n = len(self.ids)
        if self.strategy == "random":
            a, b = self.rng.choice(n, 2, replace=False)
            return self.ids[a], self.ids[b]
        self._refit_if_due()
        least = np.flatnonzero(self.shown == self.shown.min())
        a = int(self.rng.choice(least))
        # Opponents come from the least-shown images too (topped up at random when few are left).
        fresh = [int(c) for c in self.rng.permutation(least)
                 if c != a and (min(a, c), max(a, c)) not in self.offered][:self.candidates]
        others = [int(c) for c in self.rng.choice(n, min(n, self.candidates + 1), replace=False)
                  if c != a and c not in fresh and (min(a, c), max(a, c)) not in self.offered]
        pool = (fresh + others)[:self.candidates] or [int(c) for c in range(n) if c != a]
        b = min(pool, key=lambda c: abs(self.score[c] - self.score[a]))
        if self.rng.random() < 0.5:  # sides at random, so a rater's side bias averages out
            a, b = b, a
        return self.ids[a], self.ids[b]

    def _elo_update(self, a: int, b: int, y: float, k: float = 32 / 400) -> None:
        expected = 1.0 / (1.0 + 10 ** (self.score[b] - self.score[a]))
        self.score[a] += k * (y - expected)
        self.score[b] -= k * (y - expected)

    def _refit_if_due(self) -> None:
        m = len(self.judgements)
        if self.features is None or m < MIN_JUDGEMENTS_TO_FIT or (self.fitted_at and m < self.fitted_at * 1.1):
            return
        a, b, y = (np.array(c) for c in zip(*self.judgements))
        w = fit_bradley_terry(self.features[a] - self.features[b], y)
        self.score = self.features @ w
        self.fitted_at = m


def fit_bradley_terry(diffs: np.ndarray, target: np.ndarray, ridge: float = 1.0, steps: int = 8) -> np.ndarray:
    """Ridge logistic regression P = sigmoid(w . (x_left - x_right)) by Newton steps."""
    w = np.zeros(diffs.shape[1])
    eye = ridge * np.eye(diffs.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(diffs @ w, -30, 30)))
        grad = diffs.T @ (p - target) + ridge * w
        hess = (diffs * (p * (1 - p))[:, None]).T @ diffs + eye
        w -= np.linalg.solve(hess, grad)
    return w
