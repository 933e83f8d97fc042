"""WD14 tagger (SmilingWolf's wd-*-tagger-v3): the ONNX export or the timm weights.

A WD14 repo holds `selected_tags.csv` (tag_id,name,category,count; category 9 rating,
0 general, 4 character) and either `model.onnx` (input NHWC, BGR, 0-255 floats at the
model's size; outputs are sigmoid probabilities) or the timm layout (`config.json` +
`model.safetensors`; NCHW, normalised as its pretrained_cfg says, BGR; logits). ONNX is
used when present. Both pad to a white square first, as the model was trained.
"""
from __future__ import annotations

import csv
import json

import numpy as np

from curate.devices import model_threads
from curate.models.common import Adapter, ModelError, device_or_error, normalised_nchw
from curate.models.tagging import CHARACTER, GENERAL, square_resized, tag_columns

TAGS_CSV = "selected_tags.csv"


def read_tags(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise ModelError(f"{path} is not a WD14 tag list (columns tag_id,name,category,count)")
    return [r["name"] for r in rows], np.array([int(r["category"]) for r in rows])


def onnx_session(path, device_type: str):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if device_type == "cuda" else []
    options = ort.SessionOptions()
    options.intra_op_num_threads = model_threads()  # the rest of the cores decode
    try:
        return ort.InferenceSession(str(path), options, providers=providers + ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own kinds, whose text names no file
        raise ModelError(f"{path} cannot be loaded ({str(e).splitlines()[0][:200]}): it may be cut short or "
                         "damaged; fetch the model again") from None


class WD14(Adapter):
    family = "wd14"
    batch_size = 32

    def __init__(self, weights: str | None = None, general: float | None = None, character: float | None = None):
        super().__init__(weights, general=general, character=character)
        self.spec = self.weights
        self.thresholds = {GENERAL: self.settings["general"], CHARACTER: self.settings["character"]}
        folder = self.model_dir((TAGS_CSV,))
        if (folder / "model.onnx").is_file():
            self.backend = "onnx"
            # The session that says the input size is the one a CPU run uses: the file is read once
            # (and `onnx`, half a second of imports, is not needed for it).
            self._session = onnx_session(folder / "model.onnx", "cpu")
            self.size = self._session.get_inputs()[0].shape[1]  # NHWC
        elif (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            self.backend = "timm"
            self.pretrained_cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
            self.size = self.pretrained_cfg["input_size"][-1]
        else:
            raise ModelError(f"{self.spec} has neither model.onnx nor config.json + model.safetensors (timm)")
        self.decode_long_side = self.size  # padded to a square: the longer side must reach `size`

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        folder = self.model_dir((TAGS_CSV,))
        self._names, self._categories = read_tags(folder / TAGS_CSV)
        self._device, self._dtype = device_or_error(device, dtype)
        if self.backend == "onnx":
            if self._device.type != "cpu" or getattr(self, "_session", None) is None:  # a Ray worker makes its own
                self._session = onnx_session(folder / "model.onnx", self._device.type)
            self._input = self._session.get_inputs()[0].name
        else:
            import timm

            self._model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().to(self._device, self._dtype)
        if len(self._names) != self._outputs():
            raise ModelError(f"{self.spec}: {TAGS_CSV} lists {len(self._names)} tags, the model outputs "
                             f"{self._outputs()}")

    def _outputs(self) -> int:
        if self.backend == "onnx":
            return self._session.get_outputs()[0].shape[-1]
        return self._model.num_classes

    def preprocess(self, image):
        """Pad to a white square and resize (bicubic): uint8 RGB; model_input does the rest."""
        return {"pixels": square_resized(image.pixels(), self.size)}

    def model_input(self, pixels: np.ndarray):
        """uint8 RGB NHWC -> BGR: 0-255 floats NHWC for ONNX, normalised NCHW on the device for timm."""
        if self.backend == "onnx":
            return np.ascontiguousarray(pixels[..., ::-1], dtype=np.float32)
        cfg = self.pretrained_cfg
        return normalised_nchw(np.ascontiguousarray(pixels[..., ::-1]), cfg["mean"][::-1], cfg["std"][::-1],
                               self._device, self._dtype)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        if self.backend == "onnx":
            return self._session.run(None, {self._input: self.model_input(pixels)})[0]
        import torch

        with torch.inference_mode():
            logits = self._model(self.model_input(pixels))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def forward(self, batch):
        return tag_columns(self.probabilities(batch["pixels"]), self._names, self._categories, self.thresholds)
