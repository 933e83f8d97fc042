"""Image classifiers through transformers: any image-classification checkpoint (an NSFW
detector such as Falconsai/nsfw_image_detection, a style or aesthetic classifier), as
`AutoModelForImageClassification` with the checkpoint's own image processor, which
transformers' image-classification pipeline uses too.

Every label's probability is kept, in the model's label order (config.json's id2label):
softmax over the labels, or a sigmoid per label for a multi-label checkpoint
(problem_type "multi_label_classification"). `classifier` names the classifier in the
manifest's `classes` map (`classes['nsfw_image_detection/nsfw']`): the repo's or the
directory's name, so several classifiers sit side by side.
"""
from __future__ import annotations

import json
import math

import numpy as np

from curate.models.common import Adapter, ModelError, device_or_error, hub_repo

PREPROCESSOR = "preprocessor_config.json"


class ImageClassifier(Adapter):
    family = "classifier"
    batch_size = 32

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        # transformers resolves these names lazily, and two threads resolving them at once (the
        # decode threads' preprocess and the model thread's load start together) can fail with
        # "cannot import name": resolve them here, once, before any thread starts.
        import transformers

        transformers.AutoImageProcessor, transformers.AutoModelForImageClassification  # noqa: B018
        folder = self.model_dir(("config.json", PREPROCESSOR))
        config = json.loads((folder / "config.json").read_text())
        labels = config.get("id2label") or {}
        if not labels:
            raise ModelError(f"{self.weights} is not an image classifier: its config.json has no id2label")
        self.labels = [labels[str(i)] for i in range(len(labels))]
        self.multi_label = config.get("problem_type") == "multi_label_classification"
        hub = hub_repo(self.weights)
        self.name = hub[0].split("/")[-1] if hub else folder.resolve().name
        # The processor resizes to these (a shorter side, or a height and width), some after
        # scaling up by 1/crop_pct for a centre crop: the decode must reach the largest.
        processor = json.loads((folder / PREPROCESSOR).read_text())
        size = processor.get("size") or 224
        sides = size.values() if isinstance(size, dict) else [size]
        self.decode_min_side = math.ceil(max(sides) / (processor.get("crop_pct") or 1))

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        from transformers import AutoModelForImageClassification

        self._device, self._dtype = device_or_error(device, dtype)
        try:
            model = AutoModelForImageClassification.from_pretrained(self.model_dir(), dtype=self._dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load {self.weights!r} as a transformers image classifier: {e}") from None
        self._model = model.to(self._device).eval()

    def preprocess(self, image):
        """The checkpoint's own image processor, on the CPU workers (loaded once per worker)."""
        if getattr(self, "_processor", None) is None:
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self.model_dir())
        pixels = self._processor(images=image.image, return_tensors="np")["pixel_values"][0]
        return {"pixels": pixels.astype(np.float32)}

    def forward(self, batch):
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self._device, self._dtype)
        with torch.inference_mode():
            logits = self._model(pixel_values=pixels).logits.float()
        probs = (torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)).cpu().numpy()
        best = probs.argmax(axis=1)
        n = len(probs)
        return {"classifier": [self.name] * n, "labels": [self.labels] * n, "scores": probs.astype(np.float32),
                "label": [self.labels[i] for i in best], "score": probs[np.arange(n), best].astype(np.float32)}
