"""VAE adapter: diffusers AutoencoderKL from a hub id or a local directory.

A spec is `SOURCE[@DTYPE]`. SOURCE is a hub id (`stabilityai/sdxl-vae`,
`madebyollin/sdxl-vae-fp16-fix`) or a directory holding either the VAE itself
(config.json + diffusion_pytorch_model.safetensors) or a whole pipeline with the VAE in
its `vae/` subfolder. DTYPE is fp32, fp16 or bf16; without it: fp32 on CPU; on a GPU
bf16, or fp16 when the VAE's config says it needs no upcast (the fp16-fix VAE). The
original SDXL VAE overflows in fp16 (its config sets force_upcast); bf16 has fp32's range.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.common import model_name

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # names: torch loads only when a VAE does
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "auto": None} | {k: k for k in DTYPES}


class VaeError(ValueError):
    """A VAE spec that cannot be loaded; the message says what to give instead."""


@dataclass(frozen=True)
class VaeSpec:
    source: str
    dtype: str | None = None  # None: chosen by device and config

    @classmethod
    def parse(cls, spec: str, default_dtype: str | None = None) -> "VaeSpec":
        """`SOURCE[@DTYPE]`; default_dtype (e.g. from --dtype) applies when there is no @DTYPE."""
        source, _, dtype = spec.strip().rpartition("@") if "@" in spec else (spec.strip(), "", "")
        if not source:
            raise VaeError(f"empty VAE in {spec!r}: give a hub id or a directory, optionally @fp32, @fp16 or @bf16")
        dtype = dtype or default_dtype or "auto"
        if dtype not in ALIASES:
            raise VaeError(f"unknown dtype {dtype!r} for {source!r}: use fp32, fp16, bf16 (or float32, float16, bfloat16, auto)")
        return cls(source, ALIASES[dtype])

    def __str__(self) -> str:
        return model_name(self.source) + (f"@{self.dtype}" if self.dtype else "")


def load_vae(spec: VaeSpec, device: str):
    """Returns (AutoencoderKL in eval mode on device, the dtype name it runs in)."""
    import torch
    from diffusers import AutoencoderKL

    source, kwargs = _locate(spec.source)
    config = AutoencoderKL.load_config(source, **kwargs)
    dtype = spec.dtype or default_dtype(device, config)
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=getattr(torch, DTYPES[dtype]), **kwargs)
    return vae.to(device).eval().requires_grad_(False), dtype


def _locate(source: str) -> tuple[str, dict]:
    """Where the VAE's config.json is: the directory or repo itself, or its vae/ subfolder."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        if (path / "vae" / "config.json").is_file():
            return str(path), {"subfolder": "vae"}
        raise VaeError(f"{path} holds no VAE: expected config.json and diffusion_pytorch_model.safetensors, "
                       "or a pipeline directory with a vae/ subfolder")
    errors = []
    for kwargs in ({}, {"subfolder": "vae"}):  # a VAE repo, or a full pipeline repo
        try:
            AutoencoderKL.load_config(source, **kwargs)
            return source, kwargs
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise VaeError(f"cannot load VAE {source!r}: not a local directory, and the hub gave: {errors[0]} "
                   "(offline? download it once, or pass a local directory)")


def default_dtype(device: str, config) -> str:
    if not str(device).startswith("cuda"):
        return "fp32"
    return "bf16" if config.get("force_upcast", True) else "fp16"
