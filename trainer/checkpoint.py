"""Checkpoints: complete diffusers pipeline directories (or LoRA files) with the full training state.

OUTPUT/checkpoints/step-NNNNNNNN/ of a full fine-tune loads with
`StableDiffusionXLPipeline.from_pretrained` (or StableDiffusionPipeline): the trained UNet
(and text encoders), the rest of the base pipeline hard-linked (copied where links fail),
the scheduler config set to what was trained (prediction type, zero-terminal SNR).
`unet_ema/` holds the EMA weights when EMA is on. A LoRA run's checkpoint holds
lora.safetensors (and lora_ema.safetensors) in the kohya layout (trainer/lora.py) and the
scheduler config instead. `training_state/` holds the optimiser, LR schedule, GradScaler,
EMA and step, so `--resume` continues exactly. A checkpoint is written under `.tmp-*` and renamed when
complete: a process killed while writing leaves the previous checkpoint intact, and the
next run removes the debris.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

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


def save_checkpoint(output: Path, step: int, write_weights: Callable[[Path], None], state: dict, keep: int) -> Path:
    """write_weights(folder) puts the weights in the new checkpoint's folder (write_pipeline, or
    write_lora for a LoRA run); the training state goes beside them."""
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(tmp)
    (tmp / STATE).mkdir()
    torch.save(state, tmp / STATE / "state.pt")
    (tmp / STATE / "config.json").write_text(json.dumps(state["config"], indent=2))  # read by `curate sample`
    fsync_tree(tmp)
    if final.exists():  # a run that re-reaches a step replaces its old checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_scheduler(folder: Path, base: Path, updates: dict) -> None:
    """The base's scheduler config with what was trained (prediction type, zero-terminal SNR)."""
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(base, updates), indent=2))


def scheduler_config(base: Path, updates: dict) -> dict:
    return json.loads((Path(base) / "scheduler" / "scheduler_config.json").read_text()) | updates


def write_pipeline(folder: Path, models, ema: dict | None, scheduler_updates: dict) -> None:
    """A complete diffusers pipeline: the trained models, the rest of the base linked, and unet_ema/."""
    base = models.base
    shutil.copy2(base / "model_index.json", folder / "model_index.json")
    index = json.loads((base / "model_index.json").read_text())
    for name, value in sorted(index.items()):  # only pipeline components: a checkpoint can be a base
        if isinstance(value, list) and value[0] and name not in models.trained and name != "scheduler":
            link_tree(base / name, folder / name)
    for name, model in models.trained.items():
        model.save_pretrained(folder / name, safe_serialization=True)
    write_scheduler(folder, base, scheduler_updates)
    if ema is not None:
        (folder / "unet_ema").mkdir()
        shutil.copy2(folder / "unet" / "config.json", folder / "unet_ema" / "config.json")
        save_file({k: v.contiguous() for k, v in ema.items()},
                  folder / "unet_ema" / "diffusion_pytorch_model.safetensors")


def load_state(checkpoint: Path) -> tuple[dict, dict | None]:
    state = torch.load(checkpoint / STATE / "state.pt", map_location="cpu", weights_only=False)
    ema_path = checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"
    return state, (load_file(ema_path) if ema_path.is_file() else None)
