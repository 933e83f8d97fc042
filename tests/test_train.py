"""Training end to end on the tiny SDXL: overfitting, loading the checkpoint into diffusers,
exact resume after kill -9 (also mid-checkpoint), and Ray Train workers matching one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from curate.models.tiny import write_zoo
from curate.trainer.config import config_dict, config_from_dict, load_config
from curate.trainer.train import Trainer, run_training
from tests.conftest import REPO, run_cli
from tests.trainer_helpers import make_latent_dataset, probe_gradients


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["sdxl"])["sdxl"]


def losses(output) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def test_overfits_8_latents_and_checkpoint_loads_into_sdxl_pipeline(tmp_path, sdxl):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from curate.trainer.sampling import grid_cell

    make_latent_dataset(tmp_path / "ds", 8)
    (tmp_path / "prompts.txt").write_text("smile, sky --w 64 --h 64 --s 2 --d 4\n")
    config = load_config(None, output=str(tmp_path / "run"), max_steps=25, batch_size=8, precision="fp32",
                         learning_rate=1e-2, lr_schedule="constant", loss="mse", validate_every=25,
                         validation_fraction=0.0, train_text_encoder=False, prompts={"ucg": 0.0},
                         sample_prompts=str(tmp_path / "prompts.txt"))
    trainer = Trainer(tmp_path / "ds", sdxl, config)
    start = trainer.validate()["stable_train_loss"]
    summary = trainer.run(show_progress=False)
    assert summary["stable_train_loss"] < start / 2, (start, summary)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000025"
    pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], trainer.models.unet.state_dict()["conv_in.weight"])
    image = pipe("smile, sky", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0
    pipe.set_progress_bar_config(disable=True)  # the run's sample grid is what the checkpoint renders
    rendered = pipe("smile, sky", num_inference_steps=2, height=64, width=64, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(4)).images[0]
    grid = Image.open(summary["sample grid"])
    assert np.array_equal(np.asarray(grid_cell(grid, 1, 1, 0, 0, (64, 64))), np.asarray(rendered))
    assert (tmp_path / "run" / "tensorboard").is_dir() and any((tmp_path / "run" / "tensorboard").iterdir())


# A LoRA run (LoCon, dropout, text encoder adapters, the EMA on the CPU every second step) resumes as exactly
LORA = {"lora_rank": 4, "lora_alpha": 2.0, "lora_conv": True, "lora_dropout": 0.2, "ema_device": "cpu",
        "ema_update_interval": 2}


def resume_config(output, extra: dict) -> dict:
    return extra | {"output": str(output), "max_steps": 4, "batch_size": 2, "gradient_accumulation": 2,
                    "precision": "fp32", "learning_rate": 1e-3, "warmup_steps": 2, "ema_decay": 0.9, "loss": "min_snr",
                    "offset_noise": 0.05,
                    "validate_every": 2, "checkpoint_every": 1, "validation_fraction": 0.0}


@pytest.mark.parametrize("extra", [{}, LORA], ids=["full", "lora"])
def test_kill_9_then_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, sdxl, extra):
    from diffusers import StableDiffusionXLPipeline

    ds = make_latent_dataset(tmp_path / "ds", 8)
    # Both runs are fresh `curate train` processes: torch's thread count (which other tests in
    # this process may have changed) decides the float reduction order, so it must match.
    straight = tmp_path / "straight.toml"
    settings = resume_config(tmp_path / "straight", extra)
    straight.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()))
    run_cli("train", str(ds.root), "--base", str(sdxl), "--config", str(straight), "-q")
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == [1, 2, 3, 4]

    # kill -9 while a checkpoint (step 2 or later) is being written
    toml = tmp_path / "train.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in resume_config(tmp_path / "killed", extra).items()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curate", "train", str(ds.root), "--base", str(sdxl),
                             "--config", str(toml), "-q"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list(checkpoints.glob("step-*")) and list(checkpoints.glob(".tmp-step-*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-checkpoint"
    assert list(checkpoints.glob(".tmp-step-*")), "killed while writing a checkpoint: its temporary folder remains"
    complete = sorted(checkpoints.glob("step-*"))
    assert complete and sorted(losses(tmp_path / "killed")) != [1, 2, 3, 4]
    if not extra:
        StableDiffusionXLPipeline.from_pretrained(complete[-1])  # the previous checkpoint is intact

    resumed = run_cli("train", str(ds.root), "--base", str(sdxl), "--config", str(toml), "--resume", "-q")
    assert f"{complete[-1].name[5:].lstrip('0')} -> 4" in resumed.stdout  # it went on from the last checkpoint
    assert not list(checkpoints.glob(".tmp-step-*"))
    assert losses(tmp_path / "killed") == expected  # every step's loss, bit for bit
    files = (["lora.safetensors", "lora_ema.safetensors"] if extra else
             ["unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"])
    for weights in files:  # and the final weights and their moving average
        final = [load_file(run / "checkpoints" / "step-00000004" / weights)
                 for run in (tmp_path / "straight", tmp_path / "killed")]
        assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_the_next_micro_batch_and_epoch_are_built_while_one_trains(tmp_path, sdxl):
    make_latent_dataset(tmp_path / "ds", 8)
    config = load_config(None, output=str(tmp_path / "run"), max_steps=3, batch_size=2, gradient_accumulation=2,
                         precision="fp32", validate_every=0, checkpoint_every=10_000, validation_fraction=0.0)
    trainer = Trainer(tmp_path / "ds", sdxl, config)  # 4 micro-batches an epoch, 6 in all: epochs 0 and 1
    assert list(trainer.data.epochs) == [0]  # the first epoch's prompts were started before the models loaded
    trainer.train_step(0)  # micro-steps 0 and 1; micro-step 2 was handed to the thread before 1 trained
    micro, future = trainer.next_batch
    batch, size = future.result()
    epoch, indices = trainer.data.batch_at(2)
    expected = trainer.data.collate(indices, epoch, trainer.models.tokenizers)
    assert micro == 2 and size == 2 and batch["image_ids"] == expected["image_ids"]
    assert (torch.equal(batch["latents"], expected["latents"])
            and torch.equal(batch["input_ids"][0], expected["input_ids"][0]))
    assert sorted(trainer.data.epochs) == [0, 1]  # epoch 1's prompts were started with epoch 0's first batch
    ahead, fresh = trainer.data.epoch_prompts(1), trainer.data.build_prompts(1)
    rows = range(len(trainer.data.rows))
    assert all(np.array_equal(ahead.tokens_of(i), fresh.tokens_of(i)) for i in rows)
    assert not all(np.array_equal(ahead.tokens_of(i), trainer.data.epoch_prompts(0).tokens_of(i)) for i in rows)
    trainer.train_step(1)
    trainer.train_step(2)
    assert trainer.next_batch is None  # nothing is built past the last micro-step
    assert sorted(trainer.data.epochs) == [0, 1]  # nor an epoch the run does not reach


def test_gradients_are_averaged_a_bucket_at_a_time(tmp_path):
    """Buckets of 1 KiB, float32 and bfloat16 mixed: every tensor gets back its own values (here
    the sum over one gloo worker, divided by 2), in its own dtype. Across workers: the Ray test."""
    import torch.distributed as dist

    from curate.trainer.train import all_reduce_mean

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        tensors = [torch.randn(shape, dtype=dtype) for shape, dtype in
                   [((5,), torch.float32), ((30, 10), torch.float32), ((7,), torch.bfloat16), ((3, 3), torch.bfloat16),
                    ((1,), torch.float32), ((300,), torch.float32), ((64,), torch.float32)]]
        expected = [t / 2 for t in tensors]
        all_reduce_mean(tensors, 2, bucket_bytes=1024)
        assert all(t.dtype == e.dtype and torch.equal(t, e) for t, e in zip(tensors, expected))
    finally:
        dist.destroy_process_group()


def test_ray_train_two_workers_match_one_process(tmp_path, sdxl, ray_cluster):
    from curate.trainer.distributed import train_on_ray

    ds = make_latent_dataset(tmp_path / "ds", 8)
    config = load_config(None, output=str(tmp_path / "single"), batch_size=4, precision="fp32", validate_every=0,
                         validation_fraction=0.0, train_text_encoder=False, max_steps=2, checkpoint_every=2)
    single = Trainer(ds.root, sdxl, config)
    single.micro_step(0).backward()
    expected = {n: p.grad for n, p in single.models.unet.named_parameters()}

    ray_config = config_from_dict(config_dict(config) | {"workers": 2, "output": str(tmp_path / "ray")})
    summary = train_on_ray(str(ds.root), str(sdxl), ray_config, show_progress=False, loop=probe_gradients,
                           extra={"grads": str(tmp_path / "grads.pt")})
    got = torch.load(tmp_path / "grads.pt")
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name
    assert summary["checkpoint"].endswith("step-00000002")
    assert sorted(losses(tmp_path / "ray")) == [1, 2]


def test_sd15_with_every_option_trains_and_loads(tmp_path):
    """bf16 autocast, fp16 AMP with GradScaler, v-prediction with zero-terminal SNR, debiased loss,
    offset noise, a timestep range, watermark masks, EMA, gradient checkpointing, held-out validation."""
    from diffusers import StableDiffusionPipeline

    sd15 = write_zoo(tmp_path / "zoo", ["sd15"])["sd15"]
    make_latent_dataset(tmp_path / "ds", 12, buckets=[(8, 8), (8, 12)], scaling_factor=0.18215)
    common = dict(max_steps=2, batch_size=2, prediction_type="v_prediction", zero_terminal_snr=True, loss="debiased",
                  offset_noise=0.1, timestep_min=500, timestep_max=1000, mask_watermarks=True, ema_decay=0.5,
                  gradient_checkpointing=True, validation_fraction=0.25, validate_every=2, checkpoint_every=2)
    bf16 = run_training(str(tmp_path / "ds"), str(sd15),
                        load_config(None, output=str(tmp_path / "bf16"), precision="bf16",
                                    **common | {"max_steps": 1, "validate_every": 0}), show_progress=False)
    assert bf16["last loss"] == bf16["last loss"] < 10  # finite
    output = tmp_path / "fp16"
    summary = run_training(str(tmp_path / "ds"), str(sd15),
                           load_config(None, output=str(output), precision="fp16", **common),
                           show_progress=False)
    assert all(v == v and v < 10 for k, v in summary.items() if "loss" in k), summary  # finite
    assert "val_loss" in summary and "stable_train_loss" in summary
    checkpoint = output / "checkpoints" / "step-00000002"
    scheduler = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    assert (checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    assert pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)


def test_trains_on_latents_from_curate_encode(dataset, sdxl, tmp_path):
    """The real producer of latents: `curate encode` with the tiny VAE, then training reads its rows."""
    vae = write_zoo(tmp_path / "zoo", ["vae"])["vae"]
    run_cli("encode", str(dataset.root), "--vae", str(vae), "--set", "rule:step=64,min_area=16384,max_area=40000", "-q")
    encoded = {r["image_id"]: r for r in dataset.read("latents").to_pylist() if r["status"] == "ok"}
    config = load_config(None, output=str(tmp_path / "run"), max_steps=1, batch_size=1, precision="fp32",
                         validate_every=0, validation_fraction=0.0)
    trainer = Trainer(dataset.root, sdxl, config)
    assert {r.image_id for r in trainer.data.rows} == set(encoded)
    epoch, indices = trainer.data.batch_at(0)
    batch = trainer.data.collate(indices, epoch, trainer.models.tokenizers)
    r = encoded[batch["image_ids"][0]]
    assert batch["time_ids"][0].tolist() == [r["original_height"], r["original_width"], r["crop_top"], r["crop_left"],
                                             r["target_height"], r["target_width"]]
    assert list(batch["latents"].shape[1:]) == r["shape"] == [4, r["target_height"] // 8, r["target_width"] // 8]
    assert trainer.run(show_progress=False)["checkpoint"].endswith("step-00000001")


def test_a_checkpoint_is_a_base_for_the_next_run(tmp_path, sdxl):
    make_latent_dataset(tmp_path / "ds", 4)
    first = run_training(str(tmp_path / "ds"), str(sdxl), load_config(None, output=str(tmp_path / "a"), max_steps=1,
                         batch_size=4, precision="fp32", validate_every=0), show_progress=False)
    second = run_training(str(tmp_path / "ds"), first["checkpoint"], load_config(None, output=str(tmp_path / "b"),
                          max_steps=1, batch_size=4, precision="fp32", validate_every=0), show_progress=False)
    saved = tmp_path / "b" / "checkpoints" / "step-00000001"
    assert second["checkpoint"] == str(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                     "text_encoder_2", "tokenizer", "tokenizer_2", "training_state",
                                                     "unet", "vae"]
