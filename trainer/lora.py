"""LoRA (and LoCon) through PEFT, saved in the kohya / ComfyUI key layout.

With lora_rank > 0 each trained model (the UNet, and the text encoders the run trains) gets
PEFT LoRA adapters (`inject_adapter_in_model`) on its attention projections: the UNet's
`lora_targets` (to_q, to_k, to_v, to_out.0 by default) plus, with `lora_conv` (LoCon), its
ResNet convolutions; a text encoder's q, k, v and out projections. Only the adapters train;
on a GPU the frozen weights are kept in the run's half precision, the adapters in fp32.

A checkpoint's `lora.safetensors` holds the adapters in kohya's layout
(`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te1_`, `lora_te2_`),
which ComfyUI, A1111 and diffusers' `load_lora_weights` read. The names come from diffusers'
own converter (`convert_state_dict_to_kohya`), applied one key at a time so that every
parameter keeps its one key both ways: resuming reads the same tensors back, bit for bit.
The converter writes alpha = rank; the file gets the run's lora_alpha instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from curate.trainer.checkpoint import write_scheduler
from curate.trainer.config import TrainConfig

LORA_FILE = "lora.safetensors"
LORA_EMA_FILE = "lora_ema.safetensors"  # the EMA of the UNet's adapters, with the text encoders' as trained
UNET_CONV = ["conv1", "conv2", "conv_shortcut"]  # LoCon: the ResNet blocks' convolutions
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "default"  # PEFT's adapter name; its state dicts leave it out


def alpha_of(config: TrainConfig) -> float:
    return float(config.lora_alpha or config.lora_rank)


def add_lora(trained: dict[str, torch.nn.Module], config: TrainConfig, half: torch.dtype | None) -> None:
    """Adapters on every trained model (name -> model), which then trains only them; frozen
    weights in `half` when given (the run's autocast dtype on a GPU)."""
    from peft import LoraConfig, inject_adapter_in_model

    for name, model in trained.items():
        targets = ([*config.lora_targets, *(UNET_CONV if config.lora_conv else [])] if name == "unet"
                   else TEXT_ATTENTION)
        model.requires_grad_(False)
        if half is not None:
            model.to(half)
        inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=alpha_of(config),
                                           lora_dropout=config.lora_dropout, target_modules=targets), model)
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.data = param.data.float()
                param.requires_grad_(True)


def kohya_keys(trained: dict[str, torch.nn.Module]) -> dict[tuple[str, str], str]:
    """(model name, adapter parameter name) -> its key in the kohya layout."""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_kohya

    keys = {}
    for name, model in trained.items():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                peft_key = param_name.replace(f".{ADAPTER}.", ".")
                if name != "unet" and not peft_key.startswith("text_model."):
                    peft_key = f"text_model.{peft_key}"  # transformers 5 dropped the level the published names have
                peft_key = f"{name}.{peft_key}"
                (key,) = [k for k in convert_state_dict_to_kohya({peft_key: param}, StateDictType.PEFT)
                          if not k.endswith(".alpha")]
                keys[(name, param_name)] = key
    return keys


def save_lora(path: Path, trained: dict[str, torch.nn.Module], config: TrainConfig, base: Path,
              replace: dict[tuple[str, str], torch.Tensor] | None = None) -> None:
    """The adapters in kohya's layout; `replace` swaps some parameters' values (the EMA's)."""
    params = {(name, n): p for name, model in trained.items() for n, p in model.named_parameters()}
    tensors = {}
    for ref, key in kohya_keys(trained).items():
        tensors[key] = (replace or {}).get(ref, params[ref]).detach().float().cpu().contiguous()
        if ".lora_down." in key:
            tensors[key.split(".")[0] + ".alpha"] = torch.tensor(alpha_of(config))
    metadata = {"base": str(base), "lora_rank": str(config.lora_rank), "lora_alpha": str(alpha_of(config)),
                "trained": json.dumps(sorted(trained))}
    save_file(tensors, path, metadata=metadata)


def load_lora(path: Path, trained: dict[str, torch.nn.Module]) -> dict[tuple[str, str], torch.Tensor]:
    """The adapters' values from a kohya-layout file, by parameter (see save_lora)."""
    with safe_open(path, "pt") as f:
        return {ref: f.get_tensor(key) for ref, key in kohya_keys(trained).items()}


def set_lora(trained: dict[str, torch.nn.Module], values: dict[tuple[str, str], torch.Tensor]) -> None:
    params = {(name, n): p for name, model in trained.items() for n, p in model.named_parameters()}
    with torch.no_grad():
        for ref, value in values.items():
            params[ref].copy_(value)


def lora_base(path: Path) -> str:
    """The base model a LoRA file was trained on (from its metadata)."""
    with safe_open(path, "pt") as f:
        base = (f.metadata() or {}).get("base")
    if not base:
        raise ValueError(f"{path} does not name its base model: give --base")
    return base


def write_lora(folder: Path, models, config: TrainConfig, ema: dict[str, torch.Tensor] | None,
               scheduler_updates: dict) -> None:
    """A LoRA run's checkpoint: the adapters (and their EMA), and the scheduler config to sample with."""
    save_lora(folder / LORA_FILE, models.trained, config, models.base)
    if ema is not None:
        save_lora(folder / LORA_EMA_FILE, models.trained, config, models.base,
                  replace={("unet", name): value for name, value in ema.items()})
    write_scheduler(folder, models.base, scheduler_updates)


def load_lora_ema(checkpoint: Path, unet: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The EMA of the UNet's adapters, by parameter name, from a LoRA checkpoint (None without one)."""
    path = checkpoint / LORA_EMA_FILE
    if not path.is_file():
        return None
    return {name: value for (_, name), value in load_lora(path, {"unet": unet}).items()}
