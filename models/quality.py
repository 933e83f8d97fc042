"""Quality ranks on stored embeddings: the project's rank head (models/quality_head.py), or
bigASP's released scorer (its scorer.pt file) on hf_clip's embeddings.

It takes embeddings, not images: a head names the embedder it was trained on, and the
stage around it feeds only that embedder's rows, so a head never sees another model's.
bigASP's scorer records no embedder: it reads the class token of openai/clip-vit-base-patch32
(its embed.py), which the hf_clip family stores, at any commit of that repo.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from curate.models.common import Adapter, ModelError, device_or_error
from curate.models.families import family
from curate.models.quality_head import load_bigasp_scorer, load_head

BIGASP_EMBEDDER = family("hf_clip").model_value("openai/clip-vit-base-patch32", {})


class QualityHead(Adapter):
    family = "quality"
    batch_size = 1024

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        self.bigasp = Path(self.weights).is_file()  # our heads are directories; bigASP's is one file
        try:
            if self.bigasp:
                load_bigasp_scorer(self.weights)
                self.embedder = BIGASP_EMBEDDER
            else:
                self.embedder = load_head(self.weights)[1]["embedder"]  # the embeddings table's `model` it ranks
        except (ValueError, OSError) as e:
            raise ModelError(str(e)) from None

    def accepts(self, embedder: str) -> bool:
        """Whether this head ranks the embeddings whose `model` is `embedder`."""
        return embedder == self.embedder or (self.bigasp and embedder.startswith(self.embedder + "@"))

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        self._device, _ = device_or_error(device)
        head = (load_bigasp_scorer(self.weights) if self.bigasp
                else load_head(self.weights, expect_embedder=self.embedder)[0])
        self._head = head.to(self._device)

    def preprocess(self, embedding) -> dict:
        return {"embedding": np.asarray(embedding, dtype=np.float32)}

    def forward(self, batch):
        import torch

        with torch.inference_mode():
            logits = self._head(torch.from_numpy(batch["embedding"]).to(self._device))
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"rank": probs.argmax(axis=1).astype(np.int8), "probs": probs.astype(np.float32)}
