"""VAE adapter: diffusers AutoencoderKL from a hub id or a local directory.

A spec is `SOURCE[@DTYPE]`. SOURCE is a hub id (`stabilityai/sdxl-vae`,
`madebyollin/sdxl-vae-fp16-fix`, optionally `@REVISION`; pinned to its commit, as every hub
id, curate.models.common) or a directory holding either the VAE itself
(config.json + diffusion_pytorch_model.safetensors) or a whole pipeline with the VAE in
its `vae/` subfolder. DTYPE is fp32, fp16 or bf16; without it (auto): fp32 on CPU; on a GPU
bf16, or fp16 when the VAE's config says it needs no upcast (the fp16-fix VAE). The
original SDXL VAE overflows in fp16 (its config sets force_upcast); bf16 has fp32's range.

`forward` takes uint8 crops (NHWC) and gives the latent distribution's mean and log-variance,
the whole batch in one call.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from curate.devices import ALIASES, DeviceError, dtype_name, short_name
from curate.models.common import Adapter, check_files, device_or_error, hub_repo, model_name

DTYPES = {*ALIASES, "auto"}
DTYPE_LIKE = re.compile(r"b?fp\d+|b?float\d+")  # a mistyped dtype, not a hub revision


class VaeError(ValueError):
    """A VAE spec that cannot be loaded; the message says what to give instead."""


class Vae(Adapter):
    family = "vae"

    def __init__(self, weights: str | None = None, dtype: str | None = None):
        try:
            dtype = dtype_name(dtype)
        except DeviceError as e:
            raise VaeError(f"{e} (for the VAE {weights!r})") from None
        super().__init__(weights, dtype=dtype or "auto")
        self.source, self.dtype = self.weights, dtype  # dtype None: chosen by device and config

    @classmethod
    def parse(cls, spec: str, default_dtype: str | None = None) -> Vae:
        """`SOURCE[@DTYPE]`; default_dtype (e.g. from --dtype) applies when there is no @DTYPE.
        SOURCE may be `org/name@REVISION`: only a dtype's name after the last @ is a dtype."""
        spec = spec.strip()
        source, _, dtype = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if dtype not in DTYPES and not DTYPE_LIKE.fullmatch(dtype) and hub_repo(spec):
            source, dtype = spec, ""  # org/name@REVISION
        if not source:
            raise VaeError(f"empty VAE in {spec!r}: give a hub id or a directory, optionally @fp32, @fp16 or @bf16")
        return cls(source, dtype or default_dtype)

    def name(self) -> str:
        """How the VAE is named in `model` values: its weights, and the dtype when one was asked for."""
        return model_name(self.source) + (f"@{self.dtype}" if self.dtype else "")

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        self._vae, self.used_dtype = load_vae(self, device)

    @property
    def config(self):
        """The loaded VAE's config (scaling and shift factors, latent channels)."""
        return self._vae.config

    def forward(self, batch: dict) -> dict:
        """uint8 NHWC crops -> {"mean", "logvar"} of the latent distribution (torch tensors)."""
        import torch

        vae = self._vae
        # torchvision's ToTensor + Normalize(0.5, 0.5), op for op, on a contiguous NCHW tensor
        # (memory layout changes CPU conv results): encoding a crop "the usual way" gives
        # these latents bit for bit.
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).permute(0, 3, 1, 2).contiguous()
        x = pixels.float().div(255).sub(0.5).div(0.5).to(vae.device, vae.dtype)
        with torch.inference_mode():
            dist = vae.encode(x).latent_dist
        return {"mean": dist.mean, "logvar": dist.logvar}


def load_vae(spec: Vae, device: str | None):
    """Returns (AutoencoderKL in eval mode on device, the short name of the dtype it runs in)."""
    from diffusers import AutoencoderKL

    source, kwargs = _locate(spec.source)
    config = AutoencoderKL.load_config(source, **kwargs)
    # With no dtype asked for, a VAE that needs no upcast runs in fp16 on a GPU.
    dev, torch_dtype = device_or_error(device, spec.dtype,
                                       gpu_dtype=None if config.get("force_upcast", True) else "fp16")
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    return vae.to(dev).eval().requires_grad_(False), short_name(torch_dtype)


def _locate(source: str) -> tuple[str, dict]:
    """Where the VAE's config.json is: the directory or repo (at its pinned commit) itself, or its
    vae/ subfolder."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    hub = hub_repo(source)
    if hub and hub[1]:
        source, pinned = hub[0], {"revision": hub[1]}
    else:
        pinned = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            check_files(str(path))
            return str(path), {}
        if (path / "vae" / "config.json").is_file():
            check_files(str(path / "vae"))
            return str(path), {"subfolder": "vae"}
        raise VaeError(f"{path} holds no VAE: expected config.json and diffusion_pytorch_model.safetensors, "
                       "or a pipeline directory with a vae/ subfolder")
    errors = []
    for kwargs in (pinned, {**pinned, "subfolder": "vae"}):  # a VAE repo, or a full pipeline repo
        try:
            AutoencoderKL.load_config(source, **kwargs)
            return source, kwargs
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise VaeError(f"cannot load VAE {source!r}: not a local directory, and the hub gave: {errors[0]} "
                   "(offline? download it once, or pass a local directory)")
