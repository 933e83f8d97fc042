"""Checkpoints: complete diffusers pipeline directories with the full training state.

OUTPUT/checkpoints/step-NNNNNNNN/ loads with `StableDiffusionXLPipeline.from_pretrained`
(or StableDiffusionPipeline): the trained UNet (and text encoders), the rest of the base
pipeline hard-linked (copied where links fail), the scheduler config set to what was
trained (prediction type, zero-terminal SNR). `unet_ema/` holds the EMA weights when EMA
is on; `training_state/` holds the optimiser, LR schedule, GradScaler, EMA and step, so
`--resume` continues exactly. A checkpoint is written under `.tmp-*` and renamed when
complete: a process killed while writing leaves the previous checkpoint intact, and the
next run removes the debris.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "training_state"


def checkpoints_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted(p for p in checkpoints_dir(output).glob("step-*") if (p / STATE / "state.pt").is_file())
    return found[-1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved after, from its name (step-NNNNNNNN), without loading it."""
    return int(checkpoint.name.removeprefix("step-"))


def remove_debris(output: Path) -> None:
    for tmp in checkpoints_dir(output).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link a base component (copy where links fail): gigabytes of frozen weights cost nothing."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fsync_path(path)


def save_checkpoint(output: Path, step: int, models, state: dict, ema: dict | None, scheduler_updates: dict,
                    keep: int) -> Path:
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    base = models.base
    shutil.copy2(base / "model_index.json", tmp / "model_index.json")
    index = json.loads((base / "model_index.json").read_text())
    for name, value in sorted(index.items()):  # only pipeline components: a checkpoint can be a base
        if isinstance(value, list) and value[0] and name not in models.trained and name != "scheduler":
            link_tree(base / name, tmp / name)
    for name, model in models.trained.items():
        model.save_pretrained(tmp / name, safe_serialization=True)
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text()) | scheduler_updates
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (tmp / STATE).mkdir()
    if ema is not None:
        (tmp / "unet_ema").mkdir()
        shutil.copy2(tmp / "unet" / "config.json", tmp / "unet_ema" / "config.json")
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "unet_ema" / "diffusion_pytorch_model.safetensors")
    torch.save(state, tmp / STATE / "state.pt")
    fsync_tree(tmp)
    if final.exists():  # a run that re-reaches a step replaces its old checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: Path) -> tuple[dict, dict | None]:
    state = torch.load(checkpoint / STATE / "state.pt", map_location="cpu", weights_only=False)
    ema_path = checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"
    return state, (load_file(ema_path) if ema_path.is_file() else None)
