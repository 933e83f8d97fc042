"""The models being trained, loaded from a diffusers-format base directory.

SDXL (model_index.json names a text_encoder_2): two CLIP text encoders; the UNet gets
both penultimate hidden states side by side, encoder 2's projected pooled embedding,
and the six micro-conditioning time ids. SD1.5: one encoder's last hidden state; a
text encoder with more than 77 positions (Long-CLIP, 248) reads the whole prompt at once.
Prompts over 75 tokens go through the 77-position encoders in chunks of 75, each with its
own start and end token, whose hidden states are concatenated (n x 77 positions), as bigASP
and A1111 do; the pooled embedding is the first chunk's. kohya's sd-scripts keeps only the
first start and the last end token (75n + 2 positions): README says where that matters.

`clip_skip` counts as A1111 and EveryDream2 do: the states of the N-th layer from the end
(SD1.5 then applies the final layer norm, as diffusers' pipeline does); SD1.5 reads the last
layer by default, SDXL the penultimate, so for SDXL values up to 2 change nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from curate.trainer.config import TrainConfig
from curate.trainer.lora import LORA_FILE, add_lora, load_lora, set_lora

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> list[int]:
    """As diffusers' StableDiffusionXLPipeline._get_add_time_ids: original, crop, target; height before width."""
    return list(original_size + crop_top_left + target_size)


def text_layer(clip_skip: int, sdxl: bool) -> int:
    """Which hidden state, counted from the end, the UNet reads (1: the last)."""
    return max(clip_skip, 2 if sdxl else 1)


def pipeline_clip_skip(clip_skip: int, sdxl: bool) -> int | None:
    """The same layer as diffusers' pipelines count it (layers skipped past their default)."""
    return (text_layer(clip_skip, sdxl) - (2 if sdxl else 1)) or None


def text_states(encoder, out, layer: int, sdxl: bool) -> torch.Tensor:
    """The hidden states of `layer` (from the end) of an encoder's output; SD1.5 normalises them
    with the final layer norm (the last layer's already are), SDXL does not."""
    if layer == 1:
        return out.last_hidden_state
    states = out.hidden_states[-layer]
    return states if sdxl else encoder.final_layer_norm(states)


def check_latent_scaling(scales: np.ndarray, base: str | Path) -> None:
    """The latents (`scales`: their (scaling_factor, shift_factor) pairs) must be scaled as the
    base's VAE scales them (its config's scaling_factor and shift_factor; XLLsd's SD1.5 UNet with
    the SDXL VAE: 0.13025): a UNet trained on latents of another scale makes images that the
    base's pipeline decodes wrongly."""
    path = Path(base) / "vae" / "config.json"
    if not path.is_file():
        return
    vae = json.loads(path.read_text())
    expected = (round(vae.get("scaling_factor", 0.18215), 5), round(vae.get("shift_factor") or 0.0, 5))
    found = sorted({(round(scale, 5), round(shift, 5)) for scale in np.unique(scales[:, 0]).tolist()
                    for shift in np.unique(scales[scales[:, 0] == scale, 1]).tolist()})
    if found != [expected]:
        raise ValueError(f"the latents are scaled by (scaling_factor, shift_factor) {found}, the base's VAE by "
                         f"{expected} ({path}): encode them with the base's VAE (curate encode --vae {base})")


def pipeline_tokenizer(base: str | Path):
    """The (first) CLIP tokenizer of a diffusers pipeline directory: what prompts are built
    with. Loading it alone lets the prompts start before the models load."""
    from transformers import CLIPTokenizer

    base = Path(base)
    if not (base / "model_index.json").is_file() or not (base / "tokenizer").is_dir():
        raise ValueError(f"{base} is not a diffusers pipeline directory (no model_index.json or no tokenizer/)")
    return CLIPTokenizer.from_pretrained(base / "tokenizer")


class Models:
    def __init__(self, base: str | Path, config: TrainConfig, device: torch.device, checkpoint: Path | None = None):
        """Frozen parts from base; trained parts from the checkpoint when resuming."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.base = Path(base)
        index_path = self.base / "model_index.json"
        if not index_path.is_file():
            raise ValueError(f"{base} is not a diffusers pipeline directory (no model_index.json)")
        index = json.loads(index_path.read_text())
        self.sdxl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
        self.device = device
        self.lora = config.lora_rank > 0
        self.layer = text_layer(config.clip_skip, self.sdxl)
        trained = {*(["unet"] if config.train_unet else []), *(["text_encoder"] if config.train_text_encoder else []),
                   *(["text_encoder_2"] if config.train_text_encoder_2 and self.sdxl else [])}

        def source(name: str) -> Path:
            full = checkpoint is not None and name in trained and not self.lora
            return checkpoint / name if full else self.base / name

        self.unet = UNet2DConditionModel.from_pretrained(source("unet")).to(device)
        self.text_encoders = [CLIPTextModel.from_pretrained(source("text_encoder")).to(device)]
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.base / "tokenizer")]
        if self.sdxl:
            self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(source("text_encoder_2")).to(device))
            self.tokenizers.append(CLIPTokenizer.from_pretrained(self.base / "tokenizer_2"))
        base_scheduler = json.loads((self.base / "scheduler" / "scheduler_config.json").read_text())
        self.prediction_type = config.prediction_type or base_scheduler.get("prediction_type", "epsilon")
        self.scheduler = DDPMScheduler.from_pretrained(self.base / "scheduler", prediction_type=self.prediction_type,
                                                       rescale_betas_zero_snr=config.zero_terminal_snr)
        components = {"unet": self.unet, "text_encoder": self.text_encoders[0],
                      "text_encoder_2": self.text_encoders[-1]}
        self.trained = {name: components[name] for name in sorted(trained)}
        for model in [self.unet, *self.text_encoders]:
            model.requires_grad_(any(model is m for m in self.trained.values()))
        if self.lora:
            add_lora(self.trained, config, AUTOCAST.get(config.precision) if device.type == "cuda" else None)
            if checkpoint is not None:
                set_lora(self.trained, load_lora(checkpoint / LORA_FILE, self.trained))
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for name in ("text_encoder", "text_encoder_2"):
                if name in self.trained:
                    model = self.trained[name]  # transformers 5 renamed the method
                    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()

    def train(self, mode: bool = True) -> None:
        for model in [self.unet, *self.text_encoders]:
            model.train(mode and any(model is m for m in self.trained.values()))

    def encode(self, input_ids: list[torch.Tensor], n_chunks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [B, n*77] per encoder -> hidden states [B, n*77, D] (and the pooled embedding for SDXL)."""
        hidden, pooled = [], None
        for i, (encoder, ids) in enumerate(zip(self.text_encoders, input_ids)):
            batch = ids.shape[0]
            chunks = ids.to(self.device).reshape(batch * n_chunks, -1)
            out = encoder(chunks, output_hidden_states=self.layer > 1)
            states = text_states(encoder, out, self.layer, self.sdxl)
            hidden.append(states.reshape(batch, -1, states.shape[-1]))
            if i == 1:
                pooled = out.text_embeds.reshape(batch, n_chunks, -1)[:, 0]
        return torch.cat(hidden, dim=-1), pooled

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                time_ids: torch.Tensor) -> torch.Tensor:
        extra = {}
        if self.sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(self.device, hidden.dtype)}
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, **extra).sample
