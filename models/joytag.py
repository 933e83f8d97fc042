"""JoyTag (github.com/fpgaminer/joytag; the weights on the hub as fancyfeast/joytag): the
project's own implementation of its ViT, loading its published files: config.json
({"class": "ViT", "image_size": 448, "n_tags": 5000, ...}), model.safetensors and top_tags.txt
(one tag per line, in output order).

Inference only: stochastic depth and patch dropout (training-time) are identities here.
The parameter names match the published weights file, so it loads with strict=True.
Preprocessing as JoyTag's README: white square padding, bicubic resize, CLIP mean/std.
One threshold (0.4) for every tag; JoyTag has no rating output.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curate.models.common import Adapter, ModelError, device_or_error, normalised_nchw
from curate.models.tagging import GENERAL, square_resized, tag_columns

FILES = ("config.json", "model.safetensors", "top_tags.txt")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class LayerScale(nn.Module):  # JoyTag's SkipInitChannelwise
    def __init__(self, channels: int, init: float):
        super().__init__()
        self.skip = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x * self.skip


class ChannelLayerNorm(nn.Module):  # LayerNorm over the channels of an NCHW map
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.transpose(1, 3)).transpose(1, 3)


class ConvStem(nn.Module):
    """JoyTag's stem spec, e.g. 'conv:c=64;ln;conv:c=128;ln;...':
    conv (k=3, s=2, p=1 by default), ln, bn, relu, gelu."""

    def __init__(self, spec: str):
        super().__init__()
        layers, channels = [], 3
        for item in spec.split(";"):
            kind, _, opts = item.partition(":")
            o = dict(kv.split("=") for kv in opts.split(",")) if opts else {}
            if kind == "conv":
                layers.append(nn.Conv2d(channels, int(o["c"]), int(o.get("k", 3)), int(o.get("s", 2)),
                                        int(o.get("p", 1))))
                channels = int(o["c"])
            elif kind == "ln":
                layers.append(ChannelLayerNorm(channels))
            elif kind == "bn":
                layers.append(nn.BatchNorm2d(channels))
            else:
                layers.append({"relu": nn.ReLU, "gelu": nn.GELU}[kind]())
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class Block(nn.Module):
    def __init__(self, heads: int, d_model: int, mlp_dim: int, layerscale: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.skip_init1, self.skip_init2 = LayerScale(d_model, layerscale), LayerScale(d_model, layerscale)
        self.mlp = nn.Module()
        self.mlp.linear1, self.mlp.linear2 = nn.Linear(d_model, mlp_dim), nn.Linear(mlp_dim, d_model)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv_proj(self.norm1(x)).split(d, -1))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.skip_init1(self.out_proj(attn))
        return x + self.skip_init2(self.mlp.linear2(F.gelu(self.mlp.linear1(self.norm2(x)))))


def sine_positions(w: int, h: int, depth: int, dtype, device, temperature: float = 10000) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(depth // 4, device=device) / (depth // 4 - 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(dtype)


class JoyTagViT(nn.Module):
    def __init__(self, n_tags: int, image_size: int, num_blocks: int, patch_size: int, d_model: int, mlp_dim: int,
                 num_heads: int, use_sine: bool, layerscale_init: float | None = None, head_mean_after: bool = False,
                 cnn_stem: str | None = None, **training_only):
        super().__init__()
        self.image_size, self.patch_size, self.use_sine, self.head_mean_after = (
            image_size, patch_size, use_sine, head_mean_after)
        if layerscale_init is None:  # CaiT's rule, as JoyTag
            layerscale_init = 1e-1 if num_blocks <= 18 else 1e-5 if num_blocks <= 24 else 1e-6
        self.patch_embeddings = (nn.Conv2d(3, d_model, patch_size, patch_size) if cnn_stem is None
                                 else ConvStem(cnn_stem))
        self.pos_embedding = nn.Module()
        if not use_sine:
            seq = (image_size // patch_size) ** 2
            self.pos_embedding.embedding = nn.Embedding(seq, d_model)
            self.pos_embedding.register_buffer("position_ids", torch.arange(seq))
        self.blocks = nn.ModuleList(Block(num_heads, d_model, mlp_dim, layerscale_init) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_tags)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """NCHW normalised pixels -> tag logits."""
        x = self.patch_embeddings(pixels).flatten(2).transpose(1, 2)
        if self.use_sine:
            h, w = pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size
            x = x + sine_positions(w, h, x.shape[-1], x.dtype, x.device)
        else:
            x = x + self.pos_embedding.embedding(self.pos_embedding.position_ids)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x).mean(1) if self.head_mean_after else self.head(x.mean(1))


def load_joytag(folder) -> tuple[JoyTagViT, list[str]]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("class") != "ViT":
        raise ModelError(f"{folder}: JoyTag model class {config.get('class')!r} is not supported (only ViT)")
    model = JoyTagViT(**{k: v for k, v in config.items() if k != "class"})
    state = load_file(folder / "model.safetensors")
    if state["head.weight"].shape[0] == model.head.out_features + 9:  # old files carried 3 rating + 6 score outputs
        state["head.weight"], state["head.bias"] = state["head.weight"][:-9], state["head.bias"][:-9]
    model.load_state_dict(state)
    tags = [t for t in (folder / "top_tags.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    if len(tags) != model.head.out_features:
        raise ModelError(f"{folder}: top_tags.txt lists {len(tags)} tags, the model outputs {model.head.out_features}")
    return model.eval(), tags


class JoyTag(Adapter):
    family = "joytag"
    batch_size = 32

    def __init__(self, weights: str | None = None, threshold: float | None = None):
        super().__init__(weights, threshold=threshold)
        self.spec, self.threshold = self.weights, self.settings["threshold"]
        config = json.loads((self.model_dir(FILES) / "config.json").read_text())
        self.size = self.decode_long_side = config["image_size"]  # padded to a square

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        self._device, self._dtype = device_or_error(device, dtype)
        model, self._names = load_joytag(self.model_dir(FILES))
        self._model = model.to(self._device, self._dtype)
        self._categories = np.full(len(self._names), GENERAL)

    def preprocess(self, image):
        return {"pixels": square_resized(image.pixels(), self.size)}

    def forward(self, batch):
        with torch.inference_mode():
            logits = self._model(normalised_nchw(batch["pixels"], CLIP_MEAN, CLIP_STD, self._device, self._dtype))
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return tag_columns(probs, self._names, self._categories, {GENERAL: self.threshold})
