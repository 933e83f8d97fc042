"""The tiny model zoo: random-weight models in the exact on-disk layout of the real ones.

Tests and the demo load these through the same loaders that load published weights
(a hub id resolves to a local directory of these same files), so the real loading code
is what runs, offline. Each family registers a writer with `@family("name")`; a writer
gets an empty directory and fills it with that family's files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

FAMILIES: dict[str, Callable[[Path], None]] = {}


def family(name: str):
    def register(writer: Callable[[Path], None]):
        FAMILIES[name] = writer
        return writer

    return register


def write_zoo(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write the named families (all by default) under root/<name>; existing ones are kept."""
    root = Path(root)
    unknown = sorted(set(names or []) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown model families {unknown}; known: {', '.join(sorted(FAMILIES))}")
    written = {}
    for name in names or sorted(FAMILIES):
        target = root / name
        if not (target / ".complete").exists():
            target.mkdir(parents=True, exist_ok=True)
            FAMILIES[name](target)
            (target / ".complete").touch()
        written[name] = target
    return written


@family("laion-aesthetic")
def write_laion_aesthetic(target: Path) -> None:
    """The LAION aesthetic predictor's published file: a torch state dict, random weights."""
    import torch

    from models.aesthetic import WEIGHTS_FILE, AestheticPredictor

    torch.manual_seed(0)
    torch.save(AestheticPredictor().state_dict(), target / WEIGHTS_FILE)


import models.tiny_scoring  # noqa: E402,F401  (registers the scoring families)


@family("llava")
def write_llava(target: Path) -> None:
    """llava-hf layout: LlavaForConditionalGeneration, tokenizer with <image>, chat template, processor."""
    from models.tiny_llava import write_tiny_llava

    write_tiny_llava(target)


def tiny_vae(scaling_factor: float = 0.13025):
    """AutoencoderKL with the SDXL VAE's interface: 3 downsamplings (factor 8), 4 latent
    channels, SDXL's scaling factor (SD1.5's is 0.18215); a few channels, random weights.
    The one tiny VAE: the `vae` family and the tiny SDXL / SD1.5 pipelines use it."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        sample_size=1024, scaling_factor=scaling_factor, force_upcast=True,
    )


@family("vae")
def write_vae(target: Path) -> None:
    """The tiny VAE alone, in the diffusers layout."""
    tiny_vae().save_pretrained(target, safe_serialization=True)


# The tiny SDXL and SD1.5 pipelines register themselves on import (they use tiny_vae above).
import models.tiny_sd  # noqa: E402,F401
