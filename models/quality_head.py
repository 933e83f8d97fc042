"""The quality head's file formats: the project's own, written by `curate quality fit` and
read by `curate score --quality`; and bigASP's released scorer, read as it is.

A head is a directory with `head.safetensors` (the MLP's weights) and `head.json`:
{"format": "curate-quality-head", "version": 1, "embedder": <the embeddings table's
`model` value the head was trained on>, "embedding_dim": D, "hidden": [..], "ranks": 10}.
Loading refuses a head whose embedder does not match the embeddings it is given.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from curate.models.common import check_files

FORMAT = "curate-quality-head"
RANKS = 10


class RankHead(nn.Module):
    """L2-normalised embedding -> logits over ranks 0..9."""

    def __init__(self, embedding_dim: int, hidden: list[int] | tuple[int, ...] = (256,), ranks: int = RANKS):
        super().__init__()
        layers: list[nn.Module] = []
        width = embedding_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(0.1)]
            width = h
        layers.append(nn.Linear(width, ranks))
        self.net = nn.Sequential(*layers)
        self.embedding_dim, self.hidden, self.ranks = embedding_dim, list(hidden), ranks

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(nn.functional.normalize(embedding.float(), dim=-1))


def save_head(directory: str | Path, head: RankHead, embedder: str, **extra) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, directory / "head.safetensors")
    meta = {"format": FORMAT, "version": 1, "embedder": embedder, "embedding_dim": head.embedding_dim,
            "hidden": head.hidden, "ranks": head.ranks, **extra}
    (directory / "head.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_head(directory: str | Path, expect_embedder: str | None = None) -> tuple[RankHead, dict]:
    directory = Path(directory)
    meta_path = directory / "head.json"
    if not meta_path.is_file():
        raise ValueError(f"{directory} is not a quality head (no head.json); make one with `curate quality fit`")
    check_files(str(directory))
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a curate quality head (format={meta.get('format')!r})")
    if expect_embedder is not None and meta["embedder"] != expect_embedder:
        raise ValueError(
            f"the quality head {directory} was trained on embeddings from {meta['embedder']!r}, "
            f"not {expect_embedder!r}; score with --clip matching the head, or fit a head on these embeddings"
        )
    head = RankHead(meta["embedding_dim"], meta["hidden"], meta["ranks"])
    head.load_state_dict(load_file(directory / "head.safetensors"))
    return head.eval(), meta


# bigASP's quality scorer (fpgaminer/bigasp-training, quality-arena/models.py ScoreClassifier and
# score-images.py): `torch.save(model.state_dict(), "scorer.pt")` of LayerNorm(768) -> Dropout ->
# Linear(768, 1536) -> GELU -> Dropout -> Linear(1536, 10), on the raw 768-wide class token of
# openai/clip-vit-base-patch32 (models/hf_clip.py); the rank is the argmax of its softmax.
BIGASP_KEYS = {"ln.weight", "ln.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}


class BigaspScorer(nn.Module):
    def __init__(self, width: int = 768, ranks: int = RANKS):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.linear1, self.linear2 = nn.Linear(width, width * 2), nn.Linear(width * 2, ranks)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # dropout is the identity at inference
        return self.linear2(nn.functional.gelu(self.linear1(self.ln(embedding.float()))))


def load_bigasp_scorer(path: str | Path) -> BigaspScorer:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that is more than tensors
        raise ValueError(f"{path} is not bigASP's scorer.pt (a torch state dict): {e}") from None
    if not isinstance(state, dict) or set(state) != BIGASP_KEYS:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not bigASP's scorer.pt: its keys are {keys}, not {sorted(BIGASP_KEYS)}")
    head = BigaspScorer(state["ln.weight"].shape[0], state["linear2.weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()
