"""Data-parallel training on Ray Train (TorchTrainer): `curate train --workers N`.

Ray Train starts N workers and their torch.distributed process group (NCCL on GPUs,
gloo on CPU); each worker runs the same Trainer with its rank, takes its equal share of
every global batch, and gradients are averaged across workers (in 64 MiB buckets, as DDP
does) before each optimizer step. Rank 0 writes logs and checkpoints, so on several
machines --output must be a shared filesystem (and the dataset and base model readable
from every machine).
`RAY_ADDRESS` / --ray-address joins an existing cluster; otherwise a local one starts.
"""
from __future__ import annotations

from curate.trainer.config import TrainConfig, config_dict, config_from_dict


def worker_loop(settings: dict) -> None:
    import ray.train
    import ray.train.torch

    from curate.trainer.train import run_training

    context = ray.train.get_context()
    summary = run_training(settings["dataset"], settings["base"], config_from_dict(settings["config"]),
                           settings["resume"], rank=context.get_world_rank(), world=context.get_world_size(),
                           device=ray.train.torch.get_device(), show_progress=settings["show_progress"])
    ray.train.report({"steps": summary["steps"]})


def train_on_ray(dataset: str, base: str, config: TrainConfig, resume: bool = False, address: str | None = None,
                 show_progress: bool = True, loop=worker_loop, extra: dict | None = None) -> dict:
    import json
    import os
    from pathlib import Path

    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from curate.storage import is_remote, storage_env

    output = Path(config.output).resolve()
    config_values = config_dict(config) | {"output": str(output)}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [package_parent(),
                                                                                         os.environ.get("PYTHONPATH")])),
                                           **storage_env()}})  # workers reach an s3:// dataset as we do
    settings = {"dataset": dataset if is_remote(dataset) else str(Path(dataset).resolve()),
                "base": str(Path(base).resolve()), "config": config_values,
                "resume": resume, "show_progress": show_progress, **(extra or {})}
    trainer = TorchTrainer(loop, train_loop_config=settings,
                           scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=torch.cuda.is_available()),
                           run_config=RunConfig(name="train", storage_path=str(output / "ray")))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed on Ray: {result.error}")
    summary = output / "summary.json"  # written by rank 0 at the end of its run
    return json.loads(summary.read_text()) if summary.is_file() else {}


def package_parent() -> str:
    """The folder that holds the `curate` package (a worker imports it from there): not this
    file's grandparent, which in an installed wheel is the package itself, and on a worker's
    path would make its subpackages (`trainer`, `models`) top-level names."""
    import os

    import curate

    return os.path.dirname(os.path.dirname(os.path.abspath(curate.__file__)))
