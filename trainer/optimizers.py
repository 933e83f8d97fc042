"""The optimisers a run can use, built from the run's settings, and EveryDream2's learning-rate scaling.

- adamw: torch's AdamW (bigASP's).
- adamw8bit: bitsandbytes' AdamW8bit, its moments in 8 bits (a quarter of AdamW's optimiser
  memory); its kernels need CUDA, so on any other device the run stops before it starts.
- adafactor: transformers' Adafactor with a fixed learning rate (relative_step, scale_parameter
  and warmup_init off, as kohya and OneTrainer set it), so the run's schedule applies.
- prodigy: learning-rate free (Mishchenko & Defazio, `prodigyopt`): it estimates the step size
  itself; learning_rate is a multiplier on that estimate, 1.0 as its authors advise.

Every one keeps its whole state in `state_dict()`, so a resumed run continues exactly.
"""
from __future__ import annotations

import torch

from curate.trainer.config import TrainConfig

SCALE_LR_POWER = 0.55  # EveryDream2's: SD's 1e-4 at batch 4096 against dreambooth's 1e-6 at 1-2


def scaled(learning_rate: float, config: TrainConfig) -> float:
    """learning_rate x (batch x accumulation) ** 0.55 with scale_lr, else as given."""
    if not config.scale_lr:
        return learning_rate
    return learning_rate * (config.batch_size * config.gradient_accumulation) ** SCALE_LR_POWER


def make_optimizer(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    c = config
    betas = (c.adam_beta1, c.adam_beta2)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=c.adam_epsilon, weight_decay=c.weight_decay)
    if c.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError(f"optimizer = 'adamw8bit' needs a CUDA GPU (bitsandbytes' 8-bit kernels); this run is on "
                             f"{device.type}: use 'adamw' or 'adafactor'")
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(groups, betas=betas, eps=c.adam_epsilon, weight_decay=c.weight_decay)
    if c.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=c.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=c.weight_decay)
    if c.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=betas, eps=c.adam_epsilon, weight_decay=c.weight_decay)
    raise ValueError(f"unknown optimizer {c.optimizer!r}")
