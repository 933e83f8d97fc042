"""Random-weight models at the published sizes, in the published layouts: what the real
checkpoints are, less their training. The loaders read them exactly as they read the
downloads (the same files, config keys and shapes), so a test or a benchmark runs the real
architectures offline. Weights are written in float16 (half the bytes and time of the
published float32 files; the loaders cast them to the dtype they run in).

Sources of each configuration:
- open_clip_b32 (laion/CLIP-ViT-B-32-laion2B-s34B-b79K), open_clip_siglip_b16
  (timm/ViT-B-16-SigLIP): open_clip's bundled model configs, and its pretrained tags'
  preprocess configs (laion2b_s34b_b79k, webli).
- hf_clip_b32 (openai/clip-vit-base-patch32): transformers' CLIPConfig defaults, which are it.
- owlv2_base (google/owlv2-base-patch16-ensemble): transformers' Owlv2Config, vision 960 px
  in 16 px patches.
- joytag (fancyfeast/joytag): fpgaminer/joytag's training/train/Train.py default model
  (SWModel20 in Models.py: ViT-B/16 with a conv stem and sine positions) at 448 px (its
  README), 5000 tags.
- wd_vit_v3 (SmilingWolf/wd-vit-tagger-v3, the timm layout): timm's vit_base_patch16_224 at
  448 px without a class token, average pooled, gelu_tanh, over 10,861 tags.
- bigasp_scorer (fpgaminer/bigasp-training quality-arena/scorer.pt): ScoreClassifier(768, 10).
"""
from __future__ import annotations

import json
from pathlib import Path

from curate.models.tiny_scoring import save_weights, write_once

JOYTAG = {"class": "ViT", "image_size": 448, "n_tags": 5000, "num_blocks": 12, "patch_size": 16, "d_model": 768,
          "mlp_dim": 3072, "num_heads": 12, "stochdepth_rate": 0.05, "use_sine": True, "loss_type": "focal2",
          "cnn_stem": "conv:c=64;ln;relu;conv:c=128;ln;relu;conv:c=256;ln;relu;conv:c=512;ln;relu;"
                      "conv:c=768,s=1,k=1,p=0"}
WD_VIT = {"img_size": 448, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "class_token": False,
          "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"}
WD_TAGS = 10861


def half(model):
    return model.half()


def write_open_clip(folder: Path, name: str, tag: str) -> None:
    """open_clip's config for `name` with its `tag`'s preprocessing, and random weights (the
    image tower is all the embedder reads; its tokenizer files are left out)."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = {"model_cfg": open_clip.get_model_config(name),
              "preprocess_cfg": merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(name, tag))}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = open_clip.create_model(name)  # no pretrained tag: random weights, nothing downloaded
    save_weights(half(model), folder / "open_clip_model.safetensors")


def write_hf_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    half(CLIPModel(CLIPConfig())).save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)  # shortest edge 224, centre crop 224, OpenAI mean/std


def write_owlv2(folder: Path) -> None:
    from transformers import Owlv2Config

    from curate.models import tiny_scoring

    tiny_scoring.write_owlv2(folder, Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}))


def write_joytag(folder: Path) -> None:
    import torch

    from curate.models.joytag import JoyTagViT

    torch.manual_seed(0)
    model = JoyTagViT(**{k: v for k, v in JOYTAG.items() if k != "class"})
    save_weights(half(model), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(JOYTAG, indent=2))
    (folder / "top_tags.txt").write_text("".join(f"tag_{i}\n" for i in range(JOYTAG["n_tags"])))


def write_wd_vit_v3(folder: Path) -> None:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=WD_TAGS, **WD_VIT)
    save_weights(half(model), folder / "model.safetensors")
    size = WD_VIT["img_size"]
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_224", "num_classes": WD_TAGS, "num_features": 768, "global_pool": "avg",
        "model_args": WD_VIT,
        "pretrained_cfg": {"custom_load": False, "input_size": [3, size, size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5] * 3,
                           "std": [0.5] * 3, "num_classes": WD_TAGS, "pool_size": None, "first_conv": None,
                           "classifier": None}}, indent=2))
    categories = [9] * 4 + [4] * 2000 + [0] * (WD_TAGS - 2004)  # ratings, characters, general tags
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "".join(
        f"{i},tag_{i},{c},{WD_TAGS - i}\n" for i, c in enumerate(categories)))


def write_bigasp_scorer(folder: Path) -> None:
    import torch

    from curate.models.quality_head import BigaspScorer

    torch.manual_seed(0)
    torch.save(BigaspScorer(768).state_dict(), folder / "scorer.pt")


FAMILIES = {
    "open_clip_b32": lambda f: write_open_clip(f, "ViT-B-32", "laion2b_s34b_b79k"),
    "open_clip_siglip_b16": lambda f: write_open_clip(f, "ViT-B-16-SigLIP", "webli"),
    "hf_clip_b32": write_hf_clip,
    "owlv2_base": write_owlv2,
    "joytag": write_joytag,
    "wd_vit_v3": write_wd_vit_v3,
    "bigasp_scorer": write_bigasp_scorer,
}


def write_real_size(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write the named models (all by default) under root/<name>; existing ones are kept."""
    written = {}
    for name in names or FAMILIES:
        written[name] = write_once(Path(root) / name, FAMILIES[name])
    return written
