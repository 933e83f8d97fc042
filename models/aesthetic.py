"""The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor), a
baseline quality head people know, to compare a fitted head against.

It is an MLP on the L2-normalised CLIP ViT-L/14 image embedding (768 wide) that outputs a
mean opinion score of about 1..10. The published file (e.g.
`sac+logos+ava1-l14-linearMSE.pth`) is a torch state dict of an `nn.Sequential` named
`layers`: Linear(768,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout,
Linear(64,16), Linear(16,1), with no activations, so its keys are layers.{0,2,4,6,7}.
{weight,bias}. This module builds that same module and loads such a file as it is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"
EMBEDDING_DIM = 768  # CLIP ViT-L/14
SHAPES = {"layers.0": (1024, 768), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
          "layers.7": (1, 16)}


class AestheticPredictor(nn.Module):
    def __init__(self, input_size: int = EMBEDDING_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(nn.functional.normalize(embedding.float(), dim=-1)).squeeze(-1)


def weights_path(path: str | Path) -> Path:
    """A .pth file, or a directory holding the published file name."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_aesthetic(path: str | Path) -> AestheticPredictor:
    file = weights_path(path)
    if not file.is_file():
        raise ValueError(f"no aesthetic predictor weights at {file}; give the published {WEIGHTS_FILE} "
                         "or a folder holding it")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    expected = {f"{name}.{part}" for name in SHAPES for part in ("weight", "bias")}
    if not isinstance(state, dict) or set(state) != expected:
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{file} is not a LAION aesthetic predictor state dict: expected keys {sorted(expected)}, "
                         f"found {found}")
    model = AestheticPredictor(state["layers.0.weight"].shape[1])
    for name, shape in SHAPES.items():
        got = tuple(state[f"{name}.weight"].shape)
        if got[0] != shape[0] or (name != "layers.0" and got != shape):
            raise ValueError(f"{file}: {name}.weight has shape {got}, the published layout has {shape}")
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def aesthetic_scores(model: AestheticPredictor, embeddings: np.ndarray) -> np.ndarray:
    width = model.layers[0].in_features
    if embeddings.shape[1] != width:
        raise ValueError(f"the aesthetic predictor takes {width}-wide embeddings (CLIP ViT-L/14); these are "
                         f"{embeddings.shape[1]} wide: embed with ViT-L-14 to compare against it")
    return model(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))).numpy()
