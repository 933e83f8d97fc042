"""Tiny random-weight SDXL and SD1.5 pipelines in the diffusers layout.

Each is a directory like stabilityai/stable-diffusion-xl-base-1.0 or
stable-diffusion-v1-5: model_index.json plus one subfolder per component, so
`StableDiffusionXLPipeline.from_pretrained(dir)` loads it. The architectures are the
real ones (UNet2DConditionModel with text_time embeddings, CLIPTextModel and
CLIPTextModelWithProjection, AutoencoderKL with a factor-8 latent) at toy widths. The
tokenizers use the real CLIP BPE vocabulary (shipped inside open_clip), written as
vocab.json + merges.txt the way the published repositories hold them.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

CLIP_VOCAB = 49408
BOS, EOS = 49406, 49407


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """The OpenAI CLIP vocabulary and merges, derived from open_clip's bpe_simple_vocab_16e6 exactly as CLIP does."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = (units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
             + ["<|startoftext|>", "<|endoftext|>"])
    return {token: i for i, token in enumerate(vocab)}, merges


def tiny_vae(scaling_factor: float = 0.13025):
    """AutoencoderKL with the SDXL VAE's interface: 3 downsamplings (factor 8), 4 latent
    channels, SDXL's scaling factor (SD1.5's is 0.18215); a few channels, random weights.
    The one tiny VAE: the `vae` family and the tiny SDXL / SD1.5 pipelines use it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        sample_size=1024, scaling_factor=scaling_factor, force_upcast=True,
    )


def write_vae(target: Path) -> None:
    """The tiny VAE alone, in the diffusers layout."""
    tiny_vae().save_pretrained(target, safe_serialization=True)


def write_tokenizer(folder: Path, positions: int = 77, pad_token: str = "<|endoftext|>") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": positions, "do_lower_case": True,
              "clean_up_tokenization_spaces": True, "errors": "replace", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def text_encoder(with_projection: bool, positions: int = 77, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=positions,
                            projection_dim=hidden, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
                            hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_unet(cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32) if sdxl else {}
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cross_attention_dim, use_linear_projection=sdxl, **extra)


SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "steps_offset": 1}


def write_tiny_sdxl(target: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025), text_encoder=text_encoder(False), text_encoder_2=text_encoder(True),
        tokenizer=None, tokenizer_2=None, unet=tiny_unet(64, sdxl=True),
        scheduler=EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading", interpolation_type="linear"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(target)
    write_tokenizer(target / "tokenizer")
    write_tokenizer(target / "tokenizer_2", pad_token="!")
    set_component(target, "tokenizer", ["transformers", "CLIPTokenizer"])
    set_component(target, "tokenizer_2", ["transformers", "CLIPTokenizer"])


def write_tiny_sd15(target: Path, positions: int = 77, vae_scaling: float = 0.18215) -> None:
    """positions=248 gives a long-context CLIP text encoder (Long-CLIP, as in XLLsd)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(vae_scaling), text_encoder=text_encoder(False, positions), tokenizer=None,
        unet=tiny_unet(32, sdxl=False),
        scheduler=PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(target)
    write_tokenizer(target / "tokenizer", positions=positions)
    set_component(target, "tokenizer", ["transformers", "CLIPTokenizer"])


def write_tiny_xllsd(target: Path) -> None:
    """XLLsd's combination: an SD1.5 UNet with the SDXL VAE (its scaling factor) and Long-CLIP (248 positions)."""
    write_tiny_sd15(target, positions=248, vae_scaling=0.13025)


def set_component(target: Path, name: str, value: list) -> None:
    index_path = target / "model_index.json"
    index = json.loads(index_path.read_text())
    index[name] = value
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
