"""What every model adapter shares: finding weights, choosing a device, and staying picklable.

Weights are named by a local directory or a hub id. A hub id is resolved to the local
directory of its files (huggingface_hub's cache, downloaded there when a network exists),
so published weights and the tiny zoo go through the same loader.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from pipelines.stage import Stage

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model that cannot be found or loaded, said so that the user can fix it."""


def model_dir(spec: str, needs: tuple[str, ...] = ()) -> Path:
    """The local directory holding `spec`'s files: the directory itself, or a hub id's snapshot."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path
    elif HUB_ID.match(spec) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(spec))
        except Exception as e:  # offline without a cached copy, unknown repo, no network
            raise ModelError(f"cannot get {spec!r} from the hub ({type(e).__name__}: {e}); "
                             "give a local directory with the model's files instead") from None
    else:
        raise ModelError(f"{spec!r} is neither a directory nor a hub id (org/name)")
    missing = [name for name in needs if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{spec} ({folder}) lacks {', '.join(missing)}; is it the right kind of model?")
    return folder


@functools.lru_cache(maxsize=64)  # model_key() is asked for every batch
def model_name(spec: str) -> str:
    """How a model is named in the `model` column: a hub id as is; a directory by its name and
    a fingerprint of its files, so two different folders that share a name (two fine-tunes
    saved as `vae/`, say) never count as each other's work on resume."""
    path = Path(spec).expanduser()
    return f"{path.resolve().name}#{fingerprint(str(path.resolve()))}" if path.is_dir() else spec


FINGERPRINT_BYTES = 64 << 10


def fingerprint(folder: str) -> str:
    """8 hex digits from every file's name, size, head and tail: cheap even for GBs of
    weights, and different for different weights (fine-tunes differ everywhere)."""
    digest, folder = hashlib.sha256(), Path(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())  # the tail (or the rest of a small file)
    return digest.hexdigest()[:8]


def cpu_share() -> int:
    """Threads a CPU model may use next to the decode threads."""
    return max(1, (os.cpu_count() or 2) // 2)


def normalised_nchw(pixels: np.ndarray, mean, std, device, dtype):
    """A batch of uint8 NHWC pixels (as CPU workers prepare them: 4x fewer bytes than
    floats) -> (x / 255 - mean) / std as contiguous NCHW on the model's device, in its dtype."""
    import torch

    pixels = np.require(pixels, requirements="W")  # a single image straight from PIL is read-only
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous().float()
    scale = torch.as_tensor(1 / (255 * np.asarray(std, np.float64)), dtype=torch.float32, device=x.device)
    shift = torch.as_tensor(np.asarray(mean, np.float64) / np.asarray(std, np.float64), dtype=torch.float32, device=x.device)
    return x.mul_(scale[:, None, None]).sub_(shift[:, None, None]).to(dtype)


def pick_device(device: str | None):
    """(torch device, dtype): cuda in bf16 (fp16 where bf16 is missing) when present, cpu in fp32."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA device here; use --device cpu")
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


class ModelStage(Stage):
    """A stage with weights. Attributes set in setup() or lazily start with `_` and are
    left out when the stage is pickled to Ray workers (they load their own)."""

    num_gpus = 0

    def __init__(self, spec: str, device: str | None = None, batch_size: int | None = None):
        self.spec, self.device = spec, device
        if batch_size:
            self.batch_size = batch_size
        # On Ray a model actor asks for a GPU unless told to use the CPU (on a cluster
        # without GPUs the runner asks for none).
        self.num_gpus = 0 if device == "cpu" else 1

    def model_device(self):
        """(device, dtype) for setup(). On CPU torch gets half the cores, because the runner's
        decode threads use the rest: oversubscribed, torch's spinning threads ran the tiny
        pass at half speed on 2 cores."""
        device, dtype = pick_device(self.device)
        if device.type == "cpu":
            import torch

            torch.set_num_threads(cpu_share())
        return device, dtype

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
