"""Noise, targets and loss weights.

SNR(t) = alpha_bar / (1 - alpha_bar), as diffusers' compute_snr. The weights are for an
epsilon-prediction loss; with v-prediction the v-loss is (snr + 1) / snr times the
epsilon loss, so each weight is multiplied by snr / (snr + 1) to weigh the same thing:
- min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr; with v: min(snr, gamma) / (snr + 1).
- debiased estimation (Yu et al. 2023): 1 / sqrt(snr); with v: sqrt(snr) / (snr + 1).
"""
from __future__ import annotations

import torch

SNR_FLOOR = 1e-8  # zero-terminal SNR makes snr(T) = 0; epsilon weights divide by it


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def loss_weights(kind: str, snr_t: torch.Tensor, prediction_type: str, gamma: float = 5.0) -> torch.Tensor:
    if kind == "mse":
        return torch.ones_like(snr_t)
    v = prediction_type == "v_prediction"
    if kind == "min_snr":
        clipped = torch.clamp(snr_t, max=gamma)
        return clipped / (snr_t + 1) if v else clipped / snr_t.clamp(min=SNR_FLOOR)
    if kind == "debiased":
        return torch.sqrt(snr_t) / (snr_t + 1) if v else 1 / torch.sqrt(snr_t.clamp(min=SNR_FLOOR))
    raise ValueError(f"unknown loss {kind!r}")


def make_noise(shape: tuple, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise; offset noise adds a per-channel constant (Guttenberg's zero-frequency noise)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str):
    return noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over each sample's (unmasked) elements, weighted per sample, mean over the batch."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        per_sample = err.mean(dim=(1, 2, 3))
    else:
        mask = mask.to(err).expand_as(err)
        per_sample = (err * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1)
    return (per_sample * weights).mean()
