"""The one place that chooses a device and a dtype: for every model adapter, the VAE encoder
and the trainer.

The rule: a CUDA device when there is one (or when asked), in bf16 (fp16 where bf16 is
missing); the CPU in fp32. A dtype the user names wins. Dtypes have one table of names:
the short ones (`fp32`, `fp16`, `bf16`) are what `model` values and flags show; the long
ones (`float32`, ...) are torch's and are accepted too. torch is imported only when a
device is actually chosen, so asking for a name costs nothing.
"""
from __future__ import annotations

import os

# Asking whether CUDA is there must not set it up in this process: the local engine runs a
# pass in a forked process, which could not use CUDA then. torch asks NVML instead when this is set.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

# name -> torch's attribute; the short name is the canonical one
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", **{k: k for k in DTYPES}}
DTYPE_HELP = ("auto, float32, float16 or bfloat16 (short names: use fp32, fp16, bf16); auto: fp32 on CPU, bf16 on "
              "GPUs that have it, else fp16")


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what would work."""


def dtype_name(name: str | None) -> str | None:
    """The short name of a dtype the user gave (None or 'auto': let the device decide)."""
    if name in (None, "auto"):
        return None
    if name not in ALIASES:
        raise DeviceError(f"bad --dtype {name!r}: use {DTYPE_HELP}")
    return ALIASES[name]


def choose(device: str | None = None, dtype: str | None = None, gpu_dtype: str | None = None):
    """(torch.device, torch.dtype) for a model.

    device: 'cuda', 'cuda:N' or 'cpu'; None: CUDA when present. dtype: a name from the table
    or None/'auto'. gpu_dtype: the model's own preference on a GPU when the user named none
    (the fp16-fix VAE runs in fp16); by default bf16, or fp16 where bf16 is missing.
    """
    import torch

    wanted = dtype_name(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check(device)
    dev = torch.device(device)
    if wanted is None:
        if dev.type != "cuda":
            wanted = "fp32"
        else:
            wanted = dtype_name(gpu_dtype) or ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return dev, getattr(torch, DTYPES[wanted])


def check(device: str | None) -> None:
    """Fail now if `device` is not one this machine has, without setting CUDA up in this
    process (choose() asks the GPU what dtypes it has, which does)."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device here; use --device cpu")


def short_name(torch_dtype) -> str:
    """fp32, fp16 or bf16 for a torch dtype."""
    return ALIASES[str(torch_dtype).removeprefix("torch.")]


def model_threads() -> int:
    """CPU threads a model may use next to the decode threads: half the cores. Oversubscribed,
    torch's spinning threads ran the tiny scoring pass at half speed on 2 cores."""
    return max(1, (os.cpu_count() or 2) // 2)


def limit_threads(threads: int) -> None:
    """Give torch this many threads (ONNX sessions take the same number when they start)."""
    import torch

    torch.set_num_threads(threads)
