"""Noise, targets and loss weights.

SNR(t) = alpha_bar / (1 - alpha_bar), as diffusers' compute_snr. The weights are for an
epsilon-prediction loss; with v-prediction the v-loss is (snr + 1) / snr times the
epsilon loss, so min-SNR's weight is multiplied by snr / (snr + 1) to weigh the same thing:
- min_snr, min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr; with v: min(snr, gamma) / (snr + 1).
- debiased, debiased estimation (Yu et al. 2023) as kohya's sd-scripts computes it
  (library/custom_train_functions.py, apply_debiased_estimation), which users compare
  against: snr clamped at 1000 (at t = 0 SDXL's is ~1175), then 1 / sqrt(snr); with v:
  1 / (snr + 1).
- debiased_matched: 1 / sqrt(snr) carried exactly into v-loss units, sqrt(snr) / (snr + 1),
  so a step weighs under v-prediction what it weighs under epsilon; sqrt(snr) times kohya's.

At the zero-terminal-SNR endpoint (t = T, snr = 0, where v is -x0 and the model learns the
image from pure noise) the v weights are: debiased 1 (the largest of any step), min_snr and
debiased_matched 0 (that step does not train at all). Epsilon is undefined there, which is
why zero_terminal_snr needs v-prediction.
"""
from __future__ import annotations

import torch

SNR_FLOOR = 1e-8  # zero-terminal SNR makes snr(T) = 0; epsilon weights divide by it
KOHYA_SNR_CAP = 1000.0  # sd-scripts clamps snr here before its debiased weight ("at t = 0 snr is inf")


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
        capped = snr_t.clamp(max=KOHYA_SNR_CAP)
        return 1 / (capped + 1) if v else 1 / torch.sqrt(capped.clamp(min=SNR_FLOOR))
    if kind == "debiased_matched":
        return torch.sqrt(snr_t) / (snr_t + 1) if v else 1 / torch.sqrt(snr_t.clamp(min=SNR_FLOOR))
    raise ValueError(f"unknown loss {kind!r}")


def make_noise(shape: tuple, offset: float, generator: torch.Generator, pyramid_discount: float = 0.0) -> torch.Tensor:
    """Gaussian noise, or pyramid noise; offset noise adds a per-channel constant (Guttenberg's
    zero-frequency noise)."""
    noise = (pyramid_noise(shape, pyramid_discount, generator) if pyramid_discount
             else torch.randn(shape, generator=generator))
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def pyramid_noise(shape: tuple, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise (Whitaker's, EveryDream2's pyramid_noise_discount): white noise plus
    noise drawn at coarser scales (level i at 1 / r**i of the size, r a random 2 to 4 per level,
    down to a single row or column), upsampled bilinearly and weighed discount ** i; then each
    sample is scaled back to unit variance. The coarse levels add low-frequency noise that the
    model otherwise never has to remove: more dynamic range in short fine-tunes."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    for i in range(1, 10):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        small_h, small_w = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, small_h, small_w), generator=generator)
        noise += torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


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
