"""The options EveryDream2 documents (keep_tags, clip_skip, pyramid noise, scale_lr, EMA interval,
device and strength target, write_schedule, flip_p), XLLsd's SD1.5 + SDXL-VAE + Long-CLIP
combination with a text-encoder-only mode, and the optimisers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from curate.models.tiny import write_zoo
from curate.trainer.config import load_config
from curate.trainer.losses import make_noise
from curate.trainer.model import Models
from curate.trainer.prompts import PromptBuilder, PromptConfig
from curate.trainer.train import Trainer, run_training
from tests.conftest import run_cli
from tests.trainer_helpers import WORDS, make_latent_dataset


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["sdxl", "sd15", "xllsd"])


def settings(tmp_path, **extra) -> dict:
    return dict(output=str(tmp_path / "run"), max_steps=2, batch_size=4, precision="fp32", validate_every=0,
                validation_fraction=0.0, checkpoint_every=100) | extra


def test_keep_tags_keeps_the_first_n_in_place_over_1000_prompts():
    config = PromptConfig(keep_tags=3, ucg=0.0, source_weights={"tags": 1.0, "caption": 0.0, "both": 0.0},
                          score_tags=False, formatting_noise=0.0, tag_count_mean=8, tag_count_sd=3)
    builder, tags = PromptBuilder(config, seed=1), WORDS[:12]
    prompts = [builder.build(f"image {i}", i % 7, tags, None) for i in range(1000)]
    assert all(p.tags[:3] == tags[:3] and p.text.startswith("smile, long_hair, red_eyes") for p in prompts)
    assert len({tuple(p.tags[3:6]) for p in prompts}) > 100  # the rest shuffle (and are cut to the drawn count)
    unkept = PromptBuilder(PromptConfig(**{**config.__dict__, "keep_tags": 0}), seed=1)
    unkept = [unkept.build(f"image {i}", 0, tags, None) for i in range(50)]
    assert sum(p.tags[:3] == tags[:3] for p in unkept) < 5


def test_pyramid_noise_adds_variance_at_coarse_scales():
    shape = (64, 4, 32, 32)
    white = make_noise(shape, 0.0, torch.Generator().manual_seed(0))
    pyramid = {d: make_noise(shape, 0.0, torch.Generator().manual_seed(0), d) for d in (0.4, 0.8)}
    for noise in pyramid.values():  # unit variance per sample, zero mean
        assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(64), atol=1e-3)
        assert abs(noise.mean().item()) < 0.2

    def block_variance(noise, k):  # the variance of k x k block means: 1 / k^2 for white noise
        return torch.nn.functional.avg_pool2d(noise, k).var().item()

    for k in (4, 8, 16):
        assert block_variance(white, k) == pytest.approx(1 / k**2, rel=0.2)
        assert block_variance(white, k) * 2 < block_variance(pyramid[0.4], k) < block_variance(pyramid[0.8], k)
    # the coarser the scale, the larger its share over white noise
    ratios = [block_variance(pyramid[0.8], k) * k**2 for k in (4, 8, 16)]
    assert ratios[0] < ratios[1] < ratios[2]
    assert torch.equal(pyramid[0.8], make_noise(shape, 0.0, torch.Generator().manual_seed(0), 0.8))  # seeded


def test_scale_lr_is_used_and_logged(tmp_path, zoo):
    make_latent_dataset(tmp_path / "ds", 8)
    config = load_config(None, **settings(tmp_path, batch_size=2, gradient_accumulation=2, scale_lr=True,
                                          learning_rate=1e-5, text_encoder_learning_rate=1e-6,
                                          lr_schedule="constant"))
    summary = run_training(str(tmp_path / "ds"), str(zoo["sdxl"]), config, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    expected = 1e-5 * 4**0.55
    assert lines[0] == {"step": 0, "learning_rate": pytest.approx(expected),
                        "text_encoder_learning_rate": pytest.approx(1e-6 * 4**0.55)}
    assert [x["lr"] for x in lines[1:]] == [pytest.approx(expected)] * 2
    assert summary["learning rate"] == pytest.approx(expected)


def test_ema_updates_only_every_interval_on_the_cpu_with_a_strength_target(tmp_path, zoo):
    make_latent_dataset(tmp_path / "ds", 8)
    config = load_config(None, **settings(tmp_path, max_steps=4, ema_update_interval=2, ema_strength_target=0.25,
                                          ema_device="cpu", learning_rate=1e-2, train_text_encoder=False))
    trainer = Trainer(tmp_path / "ds", zoo["sdxl"], config)
    decay = 0.25 ** (2 / 4)  # decay ** (updates in the run) = the strength target
    assert trainer.ema_decay == pytest.approx(decay) and trainer.ema_decay ** 2 == pytest.approx(0.25)
    start = {n: t.clone() for n, t in trainer.ema.items()}
    assert all(t.device.type == "cpu" for t in start.values())
    trainer.train_step(0)
    assert all(torch.equal(trainer.ema[n], start[n]) for n in start)  # step 1: not an update step
    trainer.train_step(1)
    params = dict(trainer.models.unet.named_parameters())
    for name, before in start.items():
        assert torch.equal(trainer.ema[name], torch.lerp(before, params[name].detach().float(), 1 - decay))
    assert not torch.equal(trainer.ema["conv_in.weight"], start["conv_in.weight"])


def test_clip_skip_reads_the_layer_the_pipeline_reads(tmp_path, zoo):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for pipeline, name in [(StableDiffusionPipeline, "sd15"), (StableDiffusionXLPipeline, "sdxl")]:
        pipe = pipeline.from_pretrained(zoo[name])
        states = {}
        for clip_skip in (0, 3):
            config = load_config(None, **settings(tmp_path, clip_skip=clip_skip))
            models = Models(zoo[name], config, torch.device("cpu"))
            ids = [torch.tensor([tok("a red hat", padding="max_length", max_length=77).input_ids])
                   for tok in models.tokenizers]
            with torch.no_grad():
                states[clip_skip] = models.encode(ids, 1)[0]
            with torch.no_grad():
                if name == "sdxl":  # diffusers counts layers past its default, SDXL's penultimate
                    expected = pipe.encode_prompt("a red hat", device="cpu", do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip and 1)[0]
                elif clip_skip:  # as EveryDream2: the third layer from the end, through the final layer norm
                    out = pipe.text_encoder(ids[0], output_hidden_states=True)
                    expected = pipe.text_encoder.final_layer_norm(out.hidden_states[-3])
                else:
                    expected = pipe.encode_prompt("a red hat", device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)[0]
            assert torch.allclose(states[clip_skip], expected, atol=1e-6), (name, clip_skip)
        assert not torch.allclose(states[0], states[3])


def test_write_schedule_lists_every_epochs_batches(tmp_path, zoo):
    make_latent_dataset(tmp_path / "ds", 8, buckets=[(8, 8), (8, 12)], flip=True)
    config = load_config(None, **settings(tmp_path, batch_size=2, max_steps=6, write_schedule=True, flip_p=0.5))
    trainer = Trainer(tmp_path / "ds", zoo["sdxl"], config)  # 4 batches an epoch: epochs 0 and 1
    trainer.run(show_progress=False)
    for epoch in (0, 1):
        lines = (tmp_path / "run" / "schedule" / f"epoch-{epoch:04d}.tsv").read_text().splitlines()
        assert lines[0] == "micro_step\twidth\theight\tchunks\timage_id\tflipped"
        rows = [line.split("\t") for line in lines[1:]]
        plan = trainer.data.plan(epoch)
        assert [r[4] for r in rows] == [trainer.data.rows[i].image_id for batch in plan for i in batch]
        assert [int(r[0]) for r in rows] == [epoch * 4 + b for b, batch in enumerate(plan) for _ in batch]
        assert {(r[1], r[2]) for r in rows} == {("64", "64"), ("96", "64")}
        assert {r[5] for r in rows} == {"true", "false"}
    assert not (tmp_path / "run" / "schedule" / "epoch-0002.tsv").exists()


def test_flip_p_trains_on_the_mirrored_latent_with_its_crop(tmp_path, zoo):
    ds = make_latent_dataset(tmp_path / "ds", 8, flip=True)
    plain = make_latent_dataset(tmp_path / "plain", 8)
    for flip_p in (0.0, 1.0):
        config = load_config(None, **settings(tmp_path, flip_p=flip_p, resample_latents=False, mask_watermarks=True))
        trainer = Trainer(ds.root, zoo["sdxl"], config)
        epoch, indices = trainer.data.batch_at(0)
        # a crop whose mirror starts elsewhere (the helper's crops span the whole width)
        trainer.data.rows.flip_crop_left[indices] = 5
        rows = trainer.data.rows.make(indices)
        batch = trainer.data.collate(indices, epoch, trainer.models.tokenizers)
        stored = trainer.data.latents.arrays(rows)["latent"]
        expected = [lat[:, :, ::-1] if flip_p else lat for lat in stored]
        assert torch.equal(batch["latents"], torch.tensor(np.stack(expected).astype(np.float32)) * 0.13025)
        assert batch["time_ids"][:, 3].tolist() == [5.0 if flip_p else 0.0] * 4  # the mirrored crop's own left
        marked = [k for k, r in enumerate(rows) if r.boxes]  # the box (right half) mirrors to the left half
        for k in marked:
            mask = batch["mask"][k, 0]
            assert (mask[4:, :4] == 0).all() if flip_p else (mask[4:, 4:] == 0).all()
    with pytest.raises(ValueError, match="curate encode --flip"):
        Trainer(plain.root, zoo["sdxl"], load_config(None, **settings(tmp_path, flip_p=0.5)))


def test_xllsd_sd15_unet_with_sdxl_vae_and_long_clip_trains_and_generates(tmp_path, zoo, dataset):
    """XLLsd: latents from `curate encode` with the pipeline's own (SDXL) VAE, then a full run and
    a text-encoder-only run, both rendering samples; SD1.5's own VAE scale is refused."""
    from diffusers import StableDiffusionPipeline

    xllsd = zoo["xllsd"]
    run_cli("encode", str(dataset.root), "--vae", str(xllsd), "--set", "rule:step=64,min_area=16384,max_area=40000",
            "-q")
    assert {round(r["scaling_factor"], 5) for r in dataset.read("latents").to_pylist() if r["status"] == "ok"} == {
        0.13025}
    (tmp_path / "prompts.txt").write_text("a red hat, " * 40 + "--w 64 --h 64 --s 2\n")  # Long-CLIP reads it all
    common = settings(tmp_path, batch_size=1, max_steps=1, checkpoint_every=1,
                      sample_prompts=str(tmp_path / "prompts.txt"))
    summary = run_training(str(dataset.root), str(xllsd), load_config(None, **common), show_progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    assert pipe.tokenizer.model_max_length == 248 and pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    image = np.asarray(pipe("a red hat", num_inference_steps=2, height=64, width=64).images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0 and (tmp_path / "run" / "samples").is_dir()
    assert summary["sample grid"].endswith("step-00000001.png")

    # train only the text encoder: the UNet stays the base's, the encoder changes
    te_only = load_config(None, **common | {"output": str(tmp_path / "te"), "train_unet": False,
                                            "learning_rate": 1e-2})
    run_training(str(dataset.root), str(xllsd), te_only, show_progress=False)
    saved = tmp_path / "te" / "checkpoints" / "step-00000001"
    unet, base_unet = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (saved, xllsd))
    assert all(torch.equal(unet[k], base_unet[k]) for k in base_unet)
    encoder, base_encoder = (load_file(d / "text_encoder" / "model.safetensors") for d in (saved, xllsd))
    assert any(not torch.equal(encoder[k], base_encoder[k]) for k in base_encoder)

    with pytest.raises(ValueError, match=r"0\.18215.*curate encode --vae"):
        Trainer(dataset.root, zoo["sd15"], load_config(None, **common))


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_optimizers_train_and_resume_exactly(tmp_path, zoo, optimizer):
    make_latent_dataset(tmp_path / "ds", 8)
    config = load_config(None, **settings(tmp_path, max_steps=3, checkpoint_every=1, optimizer=optimizer,
                                          learning_rate=1.0 if optimizer == "prodigy" else 1e-3,
                                          train_text_encoder=False))
    straight = Trainer(tmp_path / "ds", zoo["sdxl"], config)
    straight.run(show_progress=False)
    assert type(straight.optimizer).__name__.lower() == optimizer
    saved = tmp_path / "run" / "checkpoints" / "step-00000003"
    final = load_file(saved / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(zoo["sdxl"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(final["conv_in.weight"], base["conv_in.weight"])
    shutil.rmtree(saved)
    Trainer(tmp_path / "ds", zoo["sdxl"], config, resume=True).run(show_progress=False)
    again = load_file(saved / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_adamw8bit_needs_cuda(tmp_path, zoo):
    make_latent_dataset(tmp_path / "ds", 4)
    with pytest.raises(ValueError, match="adamw8bit' needs a CUDA GPU.*use 'adamw'"):
        Trainer(tmp_path / "ds", zoo["sdxl"], load_config(None, **settings(tmp_path, optimizer="adamw8bit",
                                                                           device="cpu")))
