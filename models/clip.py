"""CLIP image embedder (open_clip): L2-normalised embeddings, as float16.

The model is an open_clip name (`ViT-B-32:laion2b_s34b_b79k`, open_clip's own registry),
a hub id of an open_clip repo (`laion/CLIP-ViT-B-32-laion2B-s34B-b79K`: open_clip_config.json
plus weights) or a local directory of the same files. Hub ids and directories load through
open_clip's `local-dir:` loader, so the tiny zoo runs the very code that real weights do.
Preprocessing is open_clip's own transform for the model, from the same config open_clip
merges: a registry name takes its pretrained tag's (SigLIP: mean/std 0.5 and `squash`, no
crop; DFN: OpenAI's mean/std, `squash`), a directory or hub id its open_clip_config.json's
`preprocess_cfg`, over open_clip's defaults (OpenAI's mean/std, shortest-side resize and a
centre crop). The normalising runs batched on the model's device.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from curate.images import resize
from curate.models.common import HUB_ID, Adapter, ModelError, device_or_error, embedding_columns, normalised_nchw

CONFIG = "open_clip_config.json"


class Clip(Adapter):
    family = "open_clip"
    batch_size = 64

    def __init__(self, weights: str | None = None):
        super().__init__(weights)
        self.spec = self.weights
        config = self._config()
        self.image_size = config["image_size"]
        if config["preprocess"].get("resize_mode") == "longest":  # fitted inside the square, padded
            self.decode_long_side = self.image_size
        else:  # resized on the shorter side and cropped (or squashed)
            self.decode_min_side = self.image_size

    def _builtin(self) -> tuple[str, str | None] | None:
        """(name, pretrained tag) when spec names a model in open_clip's own registry."""
        if Path(self.spec).expanduser().is_dir() or HUB_ID.match(self.spec):
            return None  # open_clip (seconds of imports: torchvision, timm, transformers) is needed to load only
        import open_clip

        name, _, tag = self.spec.partition(":")
        if name not in open_clip.list_models():
            return None
        if not tag:  # open_clip would build the model with random weights
            tags = ", ".join(t for n, t in open_clip.list_pretrained() if n == name)
            raise ModelError(f"--clip {name}: name its weights too, as {name}:TAG (TAG one of: {tags})")
        return name, tag

    def _config(self) -> dict:
        """The image size and the preprocess config, merged as open_clip's factory merges them
        (open_clip.factory.create_model: defaults, then the tag's or the directory's config)."""
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        builtin = self._builtin()
        if builtin:
            cfg, pre = open_clip.get_model_config(builtin[0]), open_clip.get_pretrained_cfg(*builtin)
        else:
            raw = json.loads((self.model_dir((CONFIG,)) / CONFIG).read_text())
            cfg, pre = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
        size = cfg["vision_cfg"]["image_size"]
        return {"image_size": size if isinstance(size, int) else max(size),
                "preprocess": merge_preprocess_dict(PreprocessCfg(), pre)}

    def _create(self, device=None, dtype=None):
        """(model, preprocess) exactly as open_clip builds them for this spec."""
        import open_clip

        builtin = self._builtin()
        try:
            if builtin:
                return open_clip.create_model_and_transforms(builtin[0], pretrained=builtin[1], device=device,
                                                             precision=dtype)[::2]
            local = f"local-dir:{self.model_dir((CONFIG,))}"
            return open_clip.create_model_and_transforms(local, device=device, precision=dtype)[::2]
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise ModelError(f"cannot load open_clip model {self.spec!r}: {e}") from None

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        import torch

        self._device, self._dtype = device_or_error(device, dtype)
        precision = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}[self._dtype]
        self._model, _ = self._create(self._device, precision)
        self._model.eval()

    def transform(self):
        """open_clip's own eval transform for the model, split in two: the PIL steps (resize,
        crop, mode) run per image on the CPU workers and give uint8 pixels; ToTensor and
        Normalize run batched in process(), on the model's device (4x fewer bytes to move).
        A bicubic Resize runs as `curate.images.resize` (the same filter, several times faster)."""
        if getattr(self, "_transform", None) is None:  # CPU workers never load the model
            import open_clip

            pre = self._config()["preprocess"]
            steps = open_clip.image_transform(
                self.image_size, is_train=False, mean=pre["mean"], std=pre["std"], interpolation=pre["interpolation"],
                resize_mode=pre["resize_mode"], fill_color=pre["fill_color"]).transforms
            *pil_steps, to_tensor, normalize = steps
            if "ToTensor" not in type(to_tensor).__name__ or type(normalize).__name__ != "Normalize":
                raise ModelError(f"open_clip's transform for {self.spec} does not end in ToTensor, Normalize: {steps}")
            pil_steps = [FastResize.replacing(step) or step for step in pil_steps]
            self._transform = pil_steps, np.array(normalize.mean, np.float32), np.array(normalize.std, np.float32)
        return self._transform

    def preprocess(self, image):
        steps = self.transform()[0]
        # Our resize reads the decode's pixel array (no copy out of Pillow); torchvision's steps take PIL.
        image = image.pixels() if isinstance(steps[0], FastResize) else image.image
        for step in steps:
            image = step(image)
        return {"pixels": np.asarray(image)}

    def forward(self, batch):
        import torch

        pixels = normalised_nchw(batch["pixels"], *self.transform()[1:], self._device, self._dtype)
        with torch.inference_mode():
            features = self._model.encode_image(pixels).float()
        return embedding_columns(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())


class FastResize:
    """torchvision's bicubic Resize step as `curate.images.resize`, with the same output size
    (an int sizes the shorter side, the longer one scaled and truncated). It takes a PIL image
    or uint8 HWC pixels and gives a PIL image to the steps after it."""

    def __init__(self, size: list[int]):
        self.size = size

    @classmethod
    def replacing(cls, step) -> FastResize | None:
        """The replacement for torchvision's step; None for any other step."""
        from torchvision.transforms import InterpolationMode, Resize

        if (type(step) is not Resize or step.interpolation != InterpolationMode.BICUBIC or step.max_size
                or not step.antialias):
            return None
        return cls([step.size] if isinstance(step.size, int) else list(step.size))

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image:
        h, w = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        if len(self.size) == 2:
            new = (self.size[1], self.size[0])
        elif w <= h:
            new = (self.size[0], int(self.size[0] * h / w))
        else:
            new = (int(self.size[0] * w / h), self.size[0])
        if new == (w, h):
            return image if isinstance(image, Image.Image) else Image.fromarray(image)
        return Image.fromarray(resize(image, new))
