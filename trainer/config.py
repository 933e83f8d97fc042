"""Training settings: one dataclass, read from train.toml, overridden by command-line flags.

Every setting lives in the TOML (top-level keys, and a [prompts] table for the prompt
builder); an unknown key or a wrong type is rejected with the closest right name, so a
typo never silently trains with a default. docs/train.toml documents every key.

The defaults are the bigASP post's figures. `recipe = "bigasp-v1"` or `"bigasp-v2"` starts
instead from what bigASP's own code did where it differs from the post (RECIPES); the file's
other keys and the flags still override it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from curate.trainer.prompts import PromptConfig

# What fpgaminer/bigasp-training's data.py does (tags bigasp-v1 and bigasp-v2), where it differs
# from the post: the prompt is dropped 5% of the time (the post: 10%; v1 also zeroes another 5%
# of the embeddings, which curate does not do), the tag count is int(draw) and at least 5, a tag
# becomes an alias 20% of the time, tags are written as its loop writes them; v1 prompts are the
# caption when an image has one, else tags; v2's are the caption verbatim, or 10% of the time
# tags as many as the caption's tokens / 2.5, with 1, 2 or 3 score tags at 3:2:1, none 10% of the
# time. README's table lists them beside the post's figures.
RECIPES: dict[str, dict] = {
    "bigasp-v1": {"prompts": {"ucg": 0.05, "tag_count_min": 5, "tag_count_rounding": "down", "alias_rate": 0.2,
                              "formatting": "bigasp-v1", "source_weights": {"tags": 0.0, "caption": 1.0, "both": 0.0}}},
    "bigasp-v2": {"prompts": {"ucg": 0.05, "tag_count_min": 5, "tag_count_rounding": "down",
                              "tag_count_from": "caption", "alias_rate": 0.2, "formatting": "bigasp-v2",
                              "score_tag_weights": [3.0, 2.0, 1.0], "score_tag_dropout": 0.1,
                              "source_weights": {"tags": 0.1, "caption": 0.9, "both": 0.0}, "sentence_shuffle": False}},
}
CHOICES = {
    "precision": ("fp16", "bf16", "fp32"),
    "loss": ("mse", "min_snr", "debiased", "debiased_matched"),
    "prediction_type": ("epsilon", "v_prediction"),
    "lr_schedule": ("cosine", "constant"),
    "optimizer": ("adamw", "adamw8bit", "adafactor", "prodigy"),
    "sample_weights": ("trained", "ema", "both"),
}


@dataclass
class TrainConfig:
    recipe: str | None = None  # bigasp-v1 or bigasp-v2: start from bigASP's code instead of the post (RECIPES)
    # data
    where: str | None = None  # SQL predicate over `manifest`; rank 0 is always left out unless keep_rank_0
    keep_rank_0: bool = False
    latents_model: str | None = None  # the latents table's `model` to train on (default: every VAE's, latest per image)
    # Latents are read from disk a whole row group at a time when batches are built, and up
    # to this many MiB of them stay cached per worker. A table that fits is read once per run;
    # a larger one about once an epoch, shuffled within windows of groups filling half of it.
    latent_cache_mib: float = 8192.0
    # With the VAE's moments stored (encode --keep-distribution): a fresh latent sample per
    # image and epoch (seeded), instead of the one drawn at encoding. Without them: the stored one.
    resample_latents: bool = True
    # Processes that build an epoch's prompts (0: half the cores, at most 8). A prompt takes
    # ~0.1 ms on one core, minutes for a million rows, and the first epoch's come before step 1.
    prompt_workers: int = 0
    # run
    output: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 4  # the global batch per optimizer micro-step, split across workers
    gradient_accumulation: int = 1
    workers: int = 1
    device: str | None = None  # cuda, cpu (default: cuda when present)
    # optimiser and schedule
    optimizer: str = "adamw"  # adamw, adamw8bit (bitsandbytes, CUDA only), adafactor, prodigy (learning-rate free)
    learning_rate: float = 1e-4
    scale_lr: bool = False  # EveryDream2's: learning rates x (batch_size x gradient_accumulation) ** 0.55
    text_encoder_learning_rate: float | None = None  # default: learning_rate
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    clip_grad_norm: float = 1.0  # 0 turns clipping off
    precision: str = "fp16"  # fp16 = AMP with a GradScaler, the model in fp32
    grad_scaler_init: float = 65536.0
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 turns EMA off
    ema_update_interval: int = 1  # optimizer steps between EMA updates
    ema_device: str | None = None  # cpu keeps the EMA in host memory (default: the training device)
    ema_strength_target: float = 0.0  # in (0, 1): ema_decay = target ** (interval / max_steps), logged
    # models
    train_unet: bool = True  # false: train only the text encoder(s)
    train_text_encoder: bool = True  # text encoder 1
    train_text_encoder_2: bool = False
    max_chunks: int = 3  # prompts over 75 tokens go in 75-token chunks, up to this many
    clip_skip: int = 0  # A1111's count: 2 = the penultimate layer's states (0: the model's own, SDXL's penultimate)
    # LoRA (lora_rank > 0): PEFT adapters on the trained models instead of every weight
    lora_rank: int = 0
    lora_alpha: float | None = None  # default: lora_rank (a scale of 1)
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # UNet modules
    lora_conv: bool = False  # LoCon: also the ResNet convolutions
    # diffusion and loss
    loss: str = "min_snr"
    min_snr_gamma: float = 5.0
    prediction_type: str | None = None  # default: the base model's scheduler's
    zero_terminal_snr: bool = False
    offset_noise: float = 0.0
    timestep_min: int = 0  # train on timesteps [timestep_min, timestep_max): a base/refiner split
    timestep_max: int = 1000
    mask_watermarks: bool = False  # no loss inside watermark boxes
    pyramid_noise_discount: float = 0.0  # multi-resolution noise: scale i weighs discount ** i (0: off)
    flip_p: float = 0.0  # chance per sample and epoch of the mirrored crop's latent (encode --flip)
    # validation, checkpoints, logs
    validate_every: int = 500  # steps; 0 turns validation off
    validation_fraction: float = 0.02
    validation_max: int = 2048
    stable_train_samples: int = 2048
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    write_schedule: bool = False  # each epoch's batches (micro-step, bucket, image ids) to schedule/epoch-N.tsv
    # sample images
    sample_prompts: str | None = None  # a prompts file: one a line, kohya's --n --w --h --d --s --l options
    sample_every: int = 0  # steps; samples are also rendered after the last step
    sample_steps: int = 30  # denoising steps (a line's --s wins)
    sample_guidance: float = 7.0  # classifier-free guidance scale (a line's --l wins)
    sample_weights: str = "both"  # trained, ema or both side by side (with EMA kept)
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def validate(self) -> None:
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe = {self.recipe!r} is not one of {', '.join(map(repr, RECIPES))}")
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ValueError(f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}")
        positive = ("max_steps", "batch_size", "gradient_accumulation", "workers", "log_every", "checkpoint_every",
                    "ema_update_interval", "sample_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.prompt_workers < 0:
            raise ValueError(f"prompt_workers must be 0 (half the cores) or more, got {self.prompt_workers}")
        if self.latent_cache_mib <= 0:
            raise ValueError(f"latent_cache_mib must be above 0, got {self.latent_cache_mib}")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of workers ({self.workers}): "
                             "each worker takes an equal share of every batch")
        if not 0 <= self.timestep_min < self.timestep_max <= 1000:
            raise ValueError("need 0 <= timestep_min < timestep_max <= 1000, "
                             f"got {self.timestep_min}, {self.timestep_max}")
        if not 1 <= self.max_chunks <= 3:
            raise ValueError(f"max_chunks must be 1, 2 or 3, got {self.max_chunks}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.ema_strength_target < 1:
            raise ValueError(f"ema_strength_target must be in (0, 1) (0: off), got {self.ema_strength_target}")
        if self.ema_device not in (None, "cpu"):
            raise ValueError(f"ema_device is 'cpu' or left out (the training device), got {self.ema_device!r}")
        if (self.ema_decay or self.ema_strength_target) and not self.train_unet:
            raise ValueError("EMA averages the UNet, which train_unet = false leaves frozen: turn EMA off")
        if not (self.train_unet or self.train_text_encoder or self.train_text_encoder_2):
            raise ValueError("nothing to train: train_unet, train_text_encoder and train_text_encoder_2 are all false")
        for key in ("flip_p", "lora_dropout"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} must be between 0 and 1, got {getattr(self, key)}")
        if not 0 <= self.pyramid_noise_discount < 1:
            raise ValueError(f"pyramid_noise_discount must be in [0, 1) (0: off), got {self.pyramid_noise_discount}")
        if self.lora_rank < 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise ValueError(f"lora_rank must be >= 0 (0: no LoRA) and lora_alpha above 0, got {self.lora_rank}, "
                             f"{self.lora_alpha}")
        if self.clip_skip < 0:
            raise ValueError(f"clip_skip must be 0 (the model's own layer) or more, got {self.clip_skip}")
        if self.sample_prompts and not Path(self.sample_prompts).is_file():
            raise ValueError(f"sample_prompts: no such file {self.sample_prompts}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type = 'v_prediction' "
                             "(epsilon is undefined at the last timestep)")
        self.prompts.validate()


def _check_type(key: str, value, annotation) -> object:
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is not type(None) and isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds if k is not type(None))
    raise ValueError(f"{key} must be {names}, got {value!r}")


def _apply(target, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    known = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = (f"did you mean '{prefix}{close[0]}'?" if close
                    else f"known keys: {', '.join(prefix + k for k in known)}")
            raise ValueError(f"unknown setting '{prefix}{key}'; {hint}")
        if dataclasses.is_dataclass(getattr(target, key)):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} must be a table ([{key}])")
            _apply(getattr(target, key), value, prefix=f"{key}.")
        else:
            setattr(target, key, _check_type(prefix + key, value, hints[key]))


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults, then the recipe's values, then the TOML file, then the non-None overrides
    (command-line flags)."""
    config, values = TrainConfig(), {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no such config file: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    recipe = overrides.get("recipe", values.get("recipe"))
    if recipe is not None:
        if recipe not in RECIPES:
            close = difflib.get_close_matches(str(recipe), RECIPES, n=1)
            raise ValueError(f"recipe = {recipe!r} is not one of {', '.join(map(repr, RECIPES))}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        _apply(config, RECIPES[recipe])
    _apply(config, values)
    _apply(config, overrides)
    config.validate()
    return config


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> TrainConfig:
    config = TrainConfig()
    _apply(config, values)
    return config
