"""Tiny zoo writers for the scoring models: open_clip, WD14, JoyTag, OWLv2, the quality head.

Each writes random weights (seeded, so two zoos are equal) in the published layout:
the same file names, config keys, tag CSV columns and tokenizer files as the real repos.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from models.tiny import family

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_clip_bpe(folder: Path) -> None:
    """The real CLIP BPE tokenizer as Hugging Face files (vocab.json, merges.txt), built
    from the vocabulary open_clip ships, so no tokenizer is downloaded."""
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    tokenizer = oct.SimpleTokenizer()
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


@family("open_clip")
def write_open_clip(folder: Path) -> None:
    """Like laion/CLIP-ViT-B-32-laion2B-s34B-b79K: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    import torch

    torch.manual_seed(0)
    save_weights(open_clip.CLIP(**TINY_CLIP), folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD,
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    write_clip_bpe(folder)


@family("quality_head")
def write_quality_head(folder: Path) -> None:
    """A rank head for the tiny open_clip's embeddings, in the project's own format."""
    import torch

    from models.quality_head import RankHead, save_head

    torch.manual_seed(0)
    save_head(folder, RankHead(TINY_CLIP["embed_dim"], hidden=(16,)), embedder="open_clip:open_clip")
