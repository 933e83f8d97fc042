"""Quality ranks: the project's rank head (models/quality_head.py) on stored CLIP embeddings.

It takes embeddings, not images: the head names the embedder it was trained on, and the
stage around it feeds only that embedder's rows, so a head never sees another model's.
"""
from __future__ import annotations

import numpy as np

from curate.models.common import Adapter, ModelError, device_or_error
from curate.models.quality_head import load_head


class QualityHead(Adapter):
    family = "quality"
    batch_size = 1024

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        try:
            _, meta = load_head(self.weights)
        except (ValueError, OSError) as e:
            raise ModelError(str(e)) from None
        self.embedder = meta["embedder"]  # the embeddings table's `model` it ranks

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        self._device, _ = device_or_error(device)
        head, _ = load_head(self.weights, expect_embedder=self.embedder)
        self._head = head.to(self._device)

    def preprocess(self, embedding) -> dict:
        return {"embedding": np.asarray(embedding, dtype=np.float32)}

    def forward(self, batch):
        import torch

        with torch.inference_mode():
            logits = self._head(torch.from_numpy(batch["embedding"]).to(self._device))
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"rank": probs.argmax(axis=1).astype(np.int8), "probs": probs.astype(np.float32)}
