"""The recipe's models: pair model -> ELO tournament -> 10 ranks -> rank head.

The pair model takes the embeddings of two images and gives the probability that the
left one wins. It is a Bradley-Terry model with a learned score, P(a beats b) =
sigmoid(s(a) - s(b)) where s is a small MLP on the L2-normalised embedding: swapping the
sides flips the probability exactly, and a tie is 0.5. The tournament then lets it judge
many more images than anyone rated; its ratings are binned into ranks 0..9, and the rank
head (models/quality_head.RankHead) learns to predict the rank from one embedding.
Everything is seeded: the same inputs give the same head.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from curate.models.quality_head import RANKS, RankHead

# ELO defaults: chess's, K=32 on the 400-point logistic scale, everyone starting at 1500. 50
# Swiss rounds let the best and worst images drift far enough apart to fill ten ranks.
# bigASP's post gives no settings; its code does (ELO_RECIPES).
ELO_K = 32.0
ELO_ROUNDS = 50
ELO_START = 1500.0
ELO_SAMPLE = 10_000
PAIR_EPOCHS = 80
# fpgaminer/bigasp-training quality-arena/TrainRanker.ipynb: 8192 images (DATASET_SIZE =
# 4096 * 2) start at 1500, K = 10, 8192 rounds (2048 * 4) of random pairs, and the pair
# model's verdict counts as a win (p > 0.5), not as its probability. Its rounds pair every
# image with a random derangement, so each plays twice and keeps one update (the second
# overwrites the first); here each plays once a round, against a random opponent.
ELO_RECIPES = {"bigasp": {"k": 10.0, "start": 1500.0, "rounds": 8192, "sample": 8192, "pairing": "random",
                          "outcome": "win"}}


class ScoreNet(nn.Module):
    """L2-normalised embedding -> a scalar quality score (the pair model's shared half)."""

    def __init__(self, embedding_dim: int, hidden: int = 64):
        super().__init__()
        self.scale = math.sqrt(embedding_dim)  # unit-variance inputs whatever the width
        self.net = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(nn.functional.normalize(embedding.float(), dim=-1) * self.scale).squeeze(-1)


def train_pair_model(left: np.ndarray, right: np.ndarray, target: np.ndarray, *, seed: int = 0,
                     epochs: int = PAIR_EPOCHS, hidden: int = 64, weight_decay: float = 0.05,
                     progress: Optional[Callable[[int], None]] = None) -> ScoreNet:
    """Fit P(left wins) = sigmoid(s(left) - s(right)) to targets 1 / 0 / 0.5 (tie).

    Full batch, few epochs: a few thousand noisy judgements overfit a wide embedding soon
    after that (measured in simulation at 64 and 512 wide; early stopping on held-back
    pairs did worse, as the chooser's close pairs make a noisy yardstick)."""
    torch.manual_seed(seed)
    net = ScoreNet(left.shape[1], hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=weight_decay)
    a, b, y = torch.from_numpy(left), torch.from_numpy(right), torch.from_numpy(target.astype(np.float32))
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(net(a) - net(b), y).backward()
        opt.step()
        if progress:
            progress(1)
    return net.eval()


@torch.no_grad()
def scores(net: ScoreNet, embeddings: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([net(torch.from_numpy(embeddings[i:i + batch])).numpy()
                           for i in range(0, len(embeddings), batch)] or [np.zeros(0, np.float32)])


def pair_accuracy(left_score: np.ndarray, right_score: np.ndarray, winner: list[str]) -> float | None:
    """Share of decided (non-tie) pairs where the higher score is the winner's."""
    decided = [k for k, w in enumerate(winner) if w != "tie"]
    if not decided:
        return None
    said_left = left_score[decided] > right_score[decided]
    truly_left = np.array([winner[k] == "left" for k in decided])
    return float(np.mean(said_left == truly_left))


def elo_tournament(judge: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, *, rounds: int = ELO_ROUNDS,
                   k: float = ELO_K, seed: int = 0, start: float = ELO_START, pairing: str = "swiss",
                   outcome: str = "probability", progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """ELO ratings of n players, all starting at `start`, after `rounds` rounds of one game
    each; judge(a, b) = P(a beats b).

    pairing "swiss" (neighbours by current rating, shuffled among near-equals) spends the
    games where the outcome is uncertain, as a tournament does; "random" pairs at random, as
    bigASP did. outcome "probability" uses the judge's probability as the game's score, so its
    confidence counts and no coin is flipped; "win" scores 1 to the side it favours (bigASP).
    """
    if pairing not in ("swiss", "random") or outcome not in ("probability", "win"):
        raise ValueError(f"pairing {pairing!r} must be 'swiss' or 'random', outcome {outcome!r} "
                         "'probability' or 'win'")
    rng = np.random.default_rng(seed)
    ratings = np.full(n, float(start))
    for _ in range(rounds):
        order = rng.permutation(n) if pairing == "random" else np.argsort(-(ratings + rng.uniform(0, k, n)))
        a, b = order[0:n - 1:2], order[1:n:2]
        outcome_a = judge(a, b)
        if outcome == "win":
            outcome_a = (outcome_a > 0.5).astype(np.float64)
        expected = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400.0))
        ratings[a] += k * (outcome_a - expected)
        ratings[b] -= k * (outcome_a - expected)
        if progress:
            progress(1)
    return ratings


def bin_ranks(ratings: np.ndarray, method: str = "width", ranks: int = RANKS) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 0..ranks-1 and the inner bin edges. width: equal-width bins over the rating range
    (the tails are few, as rank 0 junk and rank 9 best should be); quantile: equal counts."""
    if method == "width":
        edges = np.linspace(ratings.min(), ratings.max(), ranks + 1)[1:-1]
    elif method == "quantile":
        edges = np.quantile(ratings, np.linspace(0, 1, ranks + 1)[1:-1])
    else:
        raise ValueError(f"binning {method!r} must be 'width' or 'quantile'")
    return np.searchsorted(edges, ratings, side="right").astype(np.int64), edges


def train_rank_head(embeddings: np.ndarray, ranks: np.ndarray, *, seed: int = 0, hidden: tuple[int, ...] = (256,),
                    epochs: int = 40, batch: int = 256, progress: Optional[Callable[[int], None]] = None) -> RankHead:
    """Cross-entropy over the 10 ranks, mini-batches, AdamW."""
    torch.manual_seed(seed)
    head = RankHead(embeddings.shape[1], hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.01)
    x, y = torch.from_numpy(embeddings), torch.from_numpy(ranks)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        if progress:
            progress(1)
    return head.eval()


@torch.no_grad()
def head_probs(head: RankHead, embeddings: np.ndarray) -> np.ndarray:
    return torch.softmax(head(torch.from_numpy(embeddings)), dim=-1).numpy()


def expected_rank(probs: np.ndarray) -> np.ndarray:
    return probs @ np.arange(probs.shape[1], dtype=np.float32)
