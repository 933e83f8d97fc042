"""Quality ranks: the project's rank head (models/quality_head.py) over stored CLIP embeddings.

It reads the embeddings table, not images: the head names the embedder it was trained on,
and only that embedder's rows are scored, so a head never sees embeddings of another model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from models.common import ModelError, ModelStage
from models.quality_head import load_head


class QualityRanker(ModelStage):
    table = "quality"
    source = "embeddings"
    columns = ("image_id", "model", "status", "embedding")
    batch_size = 1024

    def __init__(self, head_dir: str, device: str | None = None, batch_size: int | None = None):
        super().__init__(head_dir, device, batch_size)
        try:
            _, meta = load_head(head_dir)
        except (ValueError, OSError) as e:
            raise ModelError(str(e)) from None
        self.embedder = meta["embedder"]
        weights = (Path(head_dir) / "head.safetensors").read_bytes()
        self.key = f"{Path(head_dir).resolve().name}:{hashlib.sha256(weights).hexdigest()[:12]}"

    def model_key(self) -> str:
        return self.key  # the head's name and a digest of its weights: a refitted head scores anew

    def source_filter(self):
        return (pc.field("model") == self.embedder) & (pc.field("status") == "ok")

    def setup(self) -> None:
        self._device, _ = self.model_device()
        head, _ = load_head(self.spec, expect_embedder=self.embedder)
        self._head = head.to(self._device)

    def prepare(self, row):
        return {"embedding": np.asarray(row["embedding"], dtype=np.float32)}

    def process(self, batch):
        import torch

        with torch.inference_mode():
            logits = self._head(torch.from_numpy(batch["embedding"]).to(self._device))
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"rank": probs.argmax(axis=1).astype(np.int8), "probs": probs.astype(np.float32)}
