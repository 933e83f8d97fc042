"""LoRA runs and sample images on the tiny SDXL: the LoRA file loads with diffusers'
load_lora_weights and changes the output, the run's sample grid equals what the pipeline
renders with the same seed and weights, and `curate sample` renders a saved checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from curate.models.tiny import write_zoo
from curate.trainer.config import load_config
from curate.trainer.sampling import grid_cell, read_prompts, sample_checkpoint
from curate.trainer.train import Trainer
from tests.conftest import run_cli
from tests.trainer_helpers import make_latent_dataset

PROMPTS = "smile, sky --w 64 --h 64 --s 2 --d 5\n# a comment\nportrait, hat --n blurry --w 64 --h 48 --s 2 --l 5.5\n"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["sdxl"])["sdxl"]


def render(pipe, prompt) -> np.ndarray:
    image = pipe(prompt.text, negative_prompt=prompt.negative, width=prompt.width, height=prompt.height,
                 num_inference_steps=prompt.steps, guidance_scale=prompt.guidance,
                 generator=torch.Generator().manual_seed(prompt.seed)).images[0]
    return np.asarray(image)


def test_lora_loads_into_the_pipeline_and_the_sample_grid_equals_its_renders(tmp_path, sdxl):
    from diffusers import StableDiffusionXLPipeline

    make_latent_dataset(tmp_path / "ds", 8)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    config = load_config(None, output=str(tmp_path / "run"), max_steps=2, batch_size=4, precision="fp32",
                         learning_rate=5e-2, lr_schedule="constant", validate_every=0, validation_fraction=0.0,
                         lora_rank=4, lora_alpha=8.0, lora_conv=True, lora_dropout=0.1, ema_decay=0.5,
                         sample_prompts=str(tmp_path / "prompts.txt"))
    trainer = Trainer(tmp_path / "ds", sdxl, config)
    trained = [n for n, p in trainer.models.unet.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert any(".conv1.lora_A" in n for n in trained)  # LoCon
    summary = trainer.run(show_progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lora.safetensors", "lora_ema.safetensors",
                                                           "scheduler", "training_state"]
    with safe_open(checkpoint / "lora.safetensors", "pt") as f:  # kohya's layout, with the run's alpha
        keys = list(f.keys())
        assert f.get_tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha").item() == 8.0
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_up_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert not any(k.startswith("lora_te2_") for k in keys)  # text encoder 2 is not trained

    grid = Image.open(summary["sample grid"])
    prompts = read_prompts(tmp_path / "prompts.txt")
    assert [(p.seed, p.negative, p.height, p.guidance) for p in prompts] == [(5, None, 64, 7.0),
                                                                            (1, "blurry", 48, 5.5)]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.set_progress_bar_config(disable=True)
    before = [render(pipe, p) for p in prompts]
    pipe.load_lora_weights(checkpoint, weight_name="lora.safetensors")
    after = [render(pipe, p) for p in prompts]
    for i, p in enumerate(prompts):
        assert np.abs(after[i].astype(int) - before[i]).max() > 10  # the LoRA changes the output
        assert np.array_equal(np.asarray(grid_cell(grid, 2, 2, 0, i, (p.width, p.height))), after[i])
    pipe.unload_lora_weights()
    pipe.load_lora_weights(checkpoint, weight_name="lora_ema.safetensors")
    for i, p in enumerate(prompts):  # the second row: the EMA's adapters
        assert np.array_equal(np.asarray(grid_cell(grid, 2, 2, 1, i, (p.width, p.height))), render(pipe, p))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [2]  # the grid in TensorBoard's Images tab

    # the same grid from the saved checkpoint, offline, as `curate sample` makes it
    again = sample_checkpoint(checkpoint, tmp_path / "prompts.txt", tmp_path / "offline", device="cpu")
    assert again == tmp_path / "offline" / "step-00000002.png"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(grid))


def test_curate_sample_renders_a_checkpoint_without_loader_bars(tmp_path, sdxl):
    make_latent_dataset(tmp_path / "ds", 4)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    config = load_config(None, output=str(tmp_path / "run"), max_steps=1, batch_size=4, precision="fp32",
                         validate_every=0, validation_fraction=0.0, train_text_encoder=False)
    Trainer(tmp_path / "ds", sdxl, config).run(show_progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    proc = run_cli("sample", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"))
    out = tmp_path / "run" / "samples" / "step-00000001.png"  # beside the run's own samples
    assert str(out) in proc.stdout.replace("\n", "") and Image.open(out).size == (2 * (64 + 4), 14 + 64 + 4)
    assert "Loading" not in proc.stderr and "%" not in proc.stderr, proc.stderr
    bad = run_cli("sample", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"), "--weights", "ema",
                  check=False)
    assert bad.returncode == 2 and "no EMA weights" in " ".join(bad.stderr.split())
    (tmp_path / "bad.txt").write_text("a cat --x 3\n")
    bad = run_cli("sample", str(checkpoint), "--prompts", str(tmp_path / "bad.txt"), check=False)
    assert bad.returncode == 2 and "bad.txt:1: bad option --x" in " ".join(bad.stderr.split())
