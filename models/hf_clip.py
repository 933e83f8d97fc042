"""CLIP's image tower through transformers (`CLIPVisionModel`), storing what bigASP's quality
scorer reads: the 768-wide class token of openai/clip-vit-base-patch32's last layer, before
the post-layernorm and the projection, not normalised.

bigASP's embed.py (fpgaminer/bigasp-training) loads `CLIPModel.from_pretrained(
"openai/clip-vit-base-patch32").vision_model`, preprocesses with its CLIPProcessor and keeps
`hidden_states[-1][:, 0, :]` as float16: that is `last_hidden_state[:, 0]` of the vision
model. Its scorer (quality-arena/scorer.pt, a LayerNorm and an MLP, models/quality_head.py)
ranks these vectors; the L2-normalised projected embeddings of open_clip are another space.

Preprocessing is the repo's preprocessor_config.json as the CLIPProcessor bigASP used (the
PIL one) applies it: the shorter side resized to `size.shortest_edge` (bicubic, the longer
side scaled and truncated), a centre crop of `crop_size`, then mean/std, which run batched
on the model's device.
"""
from __future__ import annotations

import json

import numpy as np

from curate.images import resize
from curate.models.common import Adapter, ModelError, device_or_error, embedding_columns, normalised_nchw

PREPROCESSOR = "preprocessor_config.json"


class HFClip(Adapter):
    family = "hf_clip"
    batch_size = 64

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        config = json.loads((self.model_dir(("config.json", PREPROCESSOR)) / PREPROCESSOR).read_text())
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        self.size = size["shortest_edge"] if isinstance(size, dict) else size
        self.crop = (crop["width"], crop["height"]) if isinstance(crop, dict) else (crop, crop)
        self.mean, self.std = config["image_mean"], config["image_std"]
        self.decode_min_side = self.size

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        from transformers import CLIPVisionModel

        self._device, self._dtype = device_or_error(device, dtype)
        try:  # a CLIPModel checkpoint (text and vision) gives its vision tower
            model = CLIPVisionModel.from_pretrained(self.model_dir(), dtype=self._dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load {self.weights!r} as a transformers CLIP model: {e}") from None
        self._model = model.to(self._device).eval()

    def preprocess(self, image):
        pixels = image.pixels()
        h, w = pixels.shape[:2]
        size = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
        if size != (w, h):
            pixels = resize(pixels, size)
        (cw, ch), (w, h) = self.crop, size
        top, left = (h - ch) // 2, (w - cw) // 2
        return {"pixels": np.ascontiguousarray(pixels[top:top + ch, left:left + cw])}

    def forward(self, batch):
        import torch

        pixels = normalised_nchw(batch["pixels"], self.mean, self.std, self._device, self._dtype)
        with torch.inference_mode():
            features = self._model(pixel_values=pixels).last_hidden_state[:, 0].float()
        return embedding_columns(features.cpu().numpy())
