"""Watermark detector: OWLv2 (transformers) with the text query "a watermark".

The model is a transformers directory or hub id (google/owlv2-base-patch16-ensemble).
Preprocessing as the directory's Owlv2ImageProcessor does it, in a faster order: a bicubic
resize (`curate.images.resize`) to the model's size (960 for base) on the longer side,
padding with black (0.0, as OWLv2 was trained) to a square at the bottom and right, both on
uint8 pixels on the CPU workers; the normalising (the preprocessor config's mean and std)
runs batched on the model's device. The text query is embedded once, in setup, not once
per image as the model's forward would. The predicted boxes are relative to that padded
square; `boxes_in_image` maps them to the original image, normalised to 0..1
on each axis, for any aspect ratio (the test checks it against transformers' own
post-processing). `score` is the best box's probability; `has_watermark` is score >
threshold, which makes `watermark` a tag in the manifest.
"""
from __future__ import annotations

import json

import numpy as np
from scipy.special import expit

from curate.images import resize
from curate.models.common import Adapter, ModelError, device_or_error, normalised_nchw

MAX_BOXES = 16  # the most confident boxes kept per image


def corners_in_image(pred_boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes (cx, cy, w, h relative to the padded square) -> (x0, y0, x1, y1) relative to the
    original image. The padding is at the bottom and right, so the square's side is the
    longer one; parts of a box in the padding are cut off."""
    side = max(width, height)
    cx, cy, w, h = pred_boxes.T
    corners = np.stack([(cx - w / 2) * side / width, (cy - h / 2) * side / height,
                        (cx + w / 2) * side / width, (cy + h / 2) * side / height], axis=1)
    return np.clip(corners, 0, 1)


def boxes_in_image(logits: np.ndarray, pred_boxes: np.ndarray, width: int, height: int, threshold: float) -> dict:
    """One image's row: the best score, and the boxes over threshold (most confident first)."""
    scores = expit(logits.max(axis=-1))
    over = np.flatnonzero(scores > threshold)  # usually a few of OWLv2 base's 3,600 boxes
    corners = corners_in_image(pred_boxes[over], width, height)
    on_image = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
    over, corners = over[on_image], corners[on_image]
    keep = np.argsort(-scores[over], kind="stable")[:MAX_BOXES]
    boxes = [dict(zip(("x0", "y0", "x1", "y1"), map(float, corners[i])), score=float(scores[over[i]])) for i in keep]
    best = float(scores.max()) if len(scores) else 0.0
    return {"score": best, "has_watermark": best > threshold, "boxes": boxes}


class OWLv2(Adapter):
    family = "owlv2"
    batch_size = 8

    def __init__(self, weights: str | None = None, query: str | None = None, threshold: float | None = None):
        super().__init__(weights, query=query, threshold=threshold)
        self.spec, self.query, self.threshold = self.weights, self.settings["query"], self.settings["threshold"]
        if not self.query.strip():
            raise ModelError("the watermark query is empty; say what to look for, e.g. \"a watermark\"")
        folder = self.model_dir(("config.json",))
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "owlv2":
            raise ModelError(f"{self.spec} is a {config.get('model_type')!r} model, not OWLv2")
        self.size = self.decode_long_side = config["vision_config"].get("image_size", 960)  # padded to a square

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        import torch
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        self._device, self._dtype = device_or_error(device, dtype)
        folder = self.model_dir()
        preprocess = json.loads((folder / "preprocessor_config.json").read_text())
        self._mean, self._std = preprocess["image_mean"], preprocess["image_std"]
        self._model = Owlv2ForObjectDetection.from_pretrained(folder, dtype=self._dtype).to(self._device).eval()
        text = AutoTokenizer.from_pretrained(folder)([self.query], padding="max_length", return_tensors="pt")
        owl = self._model.owlv2
        with torch.inference_mode():  # as Owlv2Model.forward embeds a query: project, L2-normalise
            pooled = owl.text_model(**{k: v.to(self._device) for k, v in text.items()}).pooler_output
            self._query = torch.nn.functional.normalize(owl.text_projection(pooled), dim=-1)

    def preprocess(self, image):
        small = image.pixels()
        h, w = small.shape[:2]
        scale = self.size / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = np.zeros((self.size, self.size, 3), np.uint8)
        # our resize: the processor's Gaussian blur + resize is ~50x slower
        pixels[:size[1], :size[0]] = resize(small, size)
        return {"pixels": pixels, "width": image.width, "height": image.height}

    def detect(self, pixels: np.ndarray):
        """The model's raw outputs for a batch of prepared uint8 squares: (logits, pred_boxes) as
        numpy; the same as Owlv2ForObjectDetection's forward with the query, less the text tower."""
        import torch

        model = self._model
        with torch.inference_mode():
            feature_map, _ = model.image_embedder(normalised_nchw(pixels, self._mean, self._std, self._device,
                                                                  self._dtype))
            n, h, w, d = feature_map.shape
            features = feature_map.reshape(n, h * w, d)
            query = self._query.expand(n, 1, -1)
            logits, _ = model.class_predictor(features, query, torch.ones(n, 1, dtype=torch.bool, device=query.device))
            boxes = model.box_predictor(features, feature_map)
        return logits.float().cpu().numpy(), boxes.float().cpu().numpy()

    def forward(self, batch):
        logits, boxes = self.detect(batch["pixels"])
        rows = [boxes_in_image(lg, bx, w, h, self.threshold)
                for lg, bx, w, h in zip(logits, boxes, batch["width"], batch["height"])]
        return {k: [r[k] for r in rows] for k in ("score", "has_watermark", "boxes")}
