"""Sample images: a prompts file rendered with the base model's diffusers pipeline and the trained
weights, as one grid PNG. The trainer renders one every `sample_every` steps and after the last
(samples/step-N.png and TensorBoard); `curate sample CHECKPOINT` renders any saved checkpoint
the same way, on another machine if need be (as bigASP did).

The prompts file has one prompt a line (blank lines and lines starting with # are skipped),
with kohya's sample options after it:

    a lighthouse at dusk, score_9 --n blurry, lowres --w 832 --h 1216 --d 7 --s 30 --l 6.5

--n the negative prompt, --w / --h the size (default: the pipeline's), --d the seed (default:
the line's number among the prompts, so every grid of a run uses the same noise), --s the
denoising steps, --l the guidance scale. The generator is a CPU one seeded with --d, so a
render depends on the weights and the prompt, not on the device that drew the noise.

Rows of the grid: the trained weights, the EMA's, or both (sample_weights); columns: the prompts.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, ImageDraw

from curate.progress import quiet_loaders
from curate.trainer.checkpoint import STATE, checkpoint_step, scheduler_config
from curate.trainer.lora import LORA_EMA_FILE, LORA_FILE, lora_base
from curate.trainer.model import AUTOCAST, pipeline_clip_skip, text_states

LABEL = 14  # pixels of caption band above each image
GAP = 4  # white pixels right of and below each cell
OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance"}


@dataclass
class SamplePrompt:
    text: str
    seed: int
    steps: int
    guidance: float
    negative: str | None = None
    width: int | None = None
    height: int | None = None


def read_prompts(path: str | Path, steps: int = 30, guidance: float = 7.0) -> list[SamplePrompt]:
    prompts = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text, *options = line.split(" --")
        prompt = SamplePrompt(text.strip(), seed=len(prompts), steps=steps, guidance=guidance)
        for option in options:
            key, _, value = option.partition(" ")
            if key not in OPTIONS or not value.strip():
                raise ValueError(f"{path}:{number}: bad option --{key}; a line is PROMPT [--n NEGATIVE] [--w WIDTH] "
                                 "[--h HEIGHT] [--d SEED] [--s STEPS] [--l GUIDANCE]")
            field = OPTIONS[key]
            try:
                kind = {"negative": str, "guidance": float}.get(field, int)
                setattr(prompt, field, kind(value.strip()))
            except ValueError:
                raise ValueError(f"{path}:{number}: --{key} takes a number, got {value.strip()!r}") from None
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one a line)")
    return prompts


@contextmanager
def swapped(module: torch.nn.Module, values: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The module's parameters temporarily set to `values` (the EMA), without a copy of the trained ones."""
    params = dict(module.named_parameters())
    kept = {name: params[name].data for name in values or {}}
    try:
        for name, value in (values or {}).items():
            params[name].data = value.to(params[name].device, params[name].dtype)
        yield
    finally:
        for name, data in kept.items():
            params[name].data = data


def load_pipeline(base: Path, components: dict, scheduler_updates: dict | None = None):
    """The base model's diffusers pipeline with `components` in place of its own; the scheduler
    as a checkpoint records it (scheduler_updates on the base's config); no safety checker."""
    import diffusers

    index = json.loads((Path(base) / "model_index.json").read_text())
    if scheduler_updates is not None:
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        components = components | {"scheduler": scheduler_class.from_config(scheduler_config(base, scheduler_updates))}
    if (index.get("safety_checker") or [None])[0]:
        components = components | {"safety_checker": None, "requires_safety_checker": False}
    quiet_loaders()  # diffusers is imported now: its "Loading pipeline components" bar goes too
    pipe = diffusers.DiffusionPipeline.from_pretrained(base, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Sampler:
    def __init__(self, pipe, prompts: list[SamplePrompt], clip_skip: int | None, device: torch.device,
                 autocast: torch.dtype | None):
        self.pipe, self.prompts, self.clip_skip = pipe, prompts, clip_skip
        self.device, self.autocast = device, autocast

    @classmethod
    def for_training(cls, models, scheduler_updates: dict, config, device: torch.device) -> Sampler:
        """The run's own modules in the base's pipeline: no copy of the weights, the VAE loaded once."""
        components = {"unet": models.unet, "text_encoder": models.text_encoders[0]}
        if models.sdxl:
            components["text_encoder_2"] = models.text_encoders[1]
        pipe = load_pipeline(models.base, components, scheduler_updates)
        pipe.vae.to(device)
        prompts = read_prompts(config.sample_prompts, config.sample_steps, config.sample_guidance)
        autocast = AUTOCAST.get(config.precision) if device.type == "cuda" else None
        return cls(pipe, prompts, pipeline_clip_skip(config.clip_skip, models.sdxl), device, autocast)

    @torch.no_grad()
    def render(self) -> list[Image.Image]:
        images = []
        for p in self.prompts:
            context = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                       else nullcontext())
            with context:
                images.append(self.pipe(**self.text(p), width=p.width, height=p.height, num_inference_steps=p.steps,
                                        guidance_scale=p.guidance,
                                        generator=torch.Generator().manual_seed(p.seed)).images[0])
        return images

    def text(self, p: SamplePrompt) -> dict:
        """The pipeline's prompt arguments. SD1.5 with clip_skip gets its embeddings from here:
        diffusers' pipeline reaches for `text_encoder.text_model`, a level transformers 5 removed."""
        if not self.clip_skip or getattr(self.pipe, "text_encoder_2", None) is not None:
            return {"prompt": p.text, "negative_prompt": p.negative, "clip_skip": self.clip_skip}
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        embeds = []
        for text in (p.text, p.negative or ""):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            embeds.append(text_states(encoder, encoder(ids, output_hidden_states=True), self.clip_skip + 1, False))
        return {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}

    def grid(self, title: str, unet: torch.nn.Module, ema: dict[str, torch.Tensor] | None,
             trained: bool = True) -> Image.Image:
        """A row for the trained weights (when `trained`) and one for the EMA's (when given)."""
        rows = []
        if trained:
            rows.append((f"{title}", self.render()))
        if ema is not None:
            with swapped(unet, ema):
                rows.append((f"{title}, EMA", self.render()))
        return make_grid(rows, [p.text for p in self.prompts])


def make_grid(rows: list[tuple[str, list[Image.Image]]], captions: list[str]) -> Image.Image:
    """Images in rows (one per set of weights) and columns (one per prompt), each under a band
    naming its row and prompt; cells as large as the largest image, images at their top left."""
    width = max(im.width for _, images in rows for im in images) + GAP
    height = max(im.height for _, images in rows for im in images) + LABEL + GAP
    grid = Image.new("RGB", (width * len(captions), height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        for c, (image, caption) in enumerate(zip(images, captions)):
            left, top = c * width, r * height
            text = f"{label}: {caption}"
            draw.text((left + 2, top + 1), text[: max(1, width // 6)], fill="black")
            grid.paste(image, (left, top + LABEL))
    return grid


def grid_cell(grid: Image.Image, rows: int, columns: int, row: int, column: int, size: tuple[int, int]) -> Image.Image:
    """The image of size (width, height) at (row, column) of a grid from make_grid."""
    left, top = column * (grid.width // columns), row * (grid.height // rows) + LABEL
    return grid.crop((left, top, left + size[0], top + size[1]))


def save_png(image: Image.Image, path: Path) -> Path:
    """Written under a temporary name and renamed: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def sample_checkpoint(checkpoint: str | Path, prompts_file: str | Path, output: str | Path | None = None,
                      base: str | None = None, weights: str | None = None, device: str | None = None,
                      steps: int | None = None, guidance: float | None = None) -> Path:
    """`curate sample`: the grid of a saved checkpoint (a pipeline, or a LoRA checkpoint on its
    base), written to OUTPUT/step-N.png (default: the run's samples/, where the trainer writes
    its own). Steps, guidance and clip_skip default to the run's settings."""
    from safetensors.torch import load_file

    from curate.devices import choose

    checkpoint = Path(checkpoint)
    lora = (checkpoint / LORA_FILE).is_file()
    if not lora and not (checkpoint / "model_index.json").is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint: no model_index.json (a pipeline) or {LORA_FILE}")
    settings_path = checkpoint / STATE / "config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    prompts = read_prompts(prompts_file, steps or settings.get("sample_steps", 30),
                           guidance or settings.get("sample_guidance", 7.0))
    has_ema = (checkpoint / (LORA_EMA_FILE if lora else "unet_ema")).exists()
    weights = weights or ("both" if has_ema else "trained")
    if weights != "trained" and not has_ema:
        raise ValueError(f"{checkpoint} holds no EMA weights: use --weights trained")
    dev, dtype = choose(device)
    base_dir = Path(base or lora_base(checkpoint / LORA_FILE)) if lora else checkpoint
    pipe = load_pipeline(base_dir, {})
    pipe.scheduler = pipe.scheduler.from_config(json.loads((checkpoint / "scheduler" / "scheduler_config.json")
                                                           .read_text()))
    pipe.to(dev, dtype)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    sampler = Sampler(pipe, prompts, pipeline_clip_skip(settings.get("clip_skip", 0), sdxl), dev, None)
    name = checkpoint.name  # the title the trainer gives the grid of the same step
    title, rows = f"step {checkpoint_step(checkpoint)}" if name.startswith("step-") else name, []
    for which in [w for w in ("trained", "ema") if weights in (w, "both")]:
        label = title if which == "trained" else f"{title}, EMA"
        if lora:
            pipe.load_lora_weights(checkpoint, weight_name=LORA_FILE if which == "trained" else LORA_EMA_FILE)
            rows.append((label, sampler.render()))
            pipe.unload_lora_weights()
        else:
            ema = load_file(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors") if which == "ema" else None
            with swapped(pipe.unet, ema):
                rows.append((label, sampler.render()))
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else Path.cwd()
    out = Path(output) if output else run / "samples"
    return save_png(make_grid(rows, [p.text for p in prompts]), out / f"{checkpoint.name}.png")
