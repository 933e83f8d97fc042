"""Trainer throughput, printed as JSON.

    python bench/train.py                      # CPU: data path per core, tiny SDXL steps/s
    python bench/train.py --device cuda --real-size   # an SDXL-size UNet (random weights), batch 8, bf16, full and LoRA

The data path is what the trainer does per sample besides the model: building the
prompt, tokenizing it, planning batches, reading latents (SDXL-size, 4x128x128 float16)
from their Parquet row groups through the trainer's LRU cache and assembling them into
tensors; it runs on one thread, so the figure is per core. epoch_prompts breaks down the
once-an-epoch part (building and tokenizing every row's prompt) on prompts of realistic
size. The rows' metadata is loaded once per run (load_rows_per_s). In "streaming" the
cache holds 1 of the table's 2 row groups, so batches read row groups from disk as a table
larger than the cache does; the windowed shuffle keeps that near one read per group and epoch, which
row_group_mib_per_sample shows (drawing from the whole table read about one 32 MiB group
per sample). tiny_cpu_streaming trains on a table larger than the cache; tiny_cpu_lora trains
rank-8 LoRA adapters (UNet attention and text encoder 1) instead of every weight. The
real-size mode times forward + backward + AdamW of SDXL's UNet architecture (2.6B
parameters) at 1024x1024 with precomputed-size text states, fully trained (fp32 weights,
bf16 autocast) and with rank-32 LoRA adapters (frozen weights in bf16, as the trainer keeps
them), and reports peak GPU memory for each.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
THREADS = torch.get_num_threads()


def data_path(rows: int, tmp: Path, sdxl: Path) -> dict:
    """Prompt building + latent reading, with the default cache (the table fits: each row
    group read once) and with a 1 MiB cache (one group kept: a table far larger than the cache)."""
    from tests.trainer_helpers import make_latent_dataset

    ds = make_latent_dataset(tmp / "ds", rows, buckets=[(128, 128), (112, 144), (144, 112)])
    torch.set_num_threads(1)
    return {"cached": data_path_with(ds, sdxl, {}), "streaming": data_path_with(ds, sdxl, {"latent_cache_mib": 1})}


def data_path_with(ds, sdxl: Path, settings: dict) -> dict:
    from transformers import CLIPTokenizer

    from curate.trainer.config import load_config
    from curate.trainer.data import TrainData, load_rows

    rows = ds.read("latents", ["image_id"]).num_rows
    config = load_config(None, batch_size=8, **settings)
    started = time.perf_counter()
    loaded = load_rows(ds, config)
    load_s = time.perf_counter() - started
    tokenizer = CLIPTokenizer.from_pretrained(sdxl / "tokenizer")
    data = TrainData(loaded, config, tokenizer)
    started = time.perf_counter()
    samples = 0
    for epoch in range(2):
        for batch in data.plan(epoch):
            collated = data.collate(batch, epoch, [tokenizer, tokenizer])
            samples += collated["latents"].shape[0]
    prompt_batch_s = time.perf_counter() - started
    group_bytes = {g: pq.ParquetFile(g[0]).metadata.row_group(g[1]).total_byte_size for g in data.latents.reads}
    return {"rows": rows, "latent_shape": list(loaded[0].shape), "load_rows_per_s": round(rows / load_s, 1),
            "row_groups": len({(r.part, r.row_group) for r in loaded}), "latent_cache_mib": config.latent_cache_mib,
            "row_group_reads": sum(data.latents.reads.values()),
            "row_group_mib_per_sample": round(sum(n * group_bytes[g] for g, n in data.latents.reads.items())
                                              / samples / 2**20, 2),
            "data_path_samples_per_s_per_core": round(samples / prompt_batch_s, 1)}


def epoch_prompts(rows: int, tmp: Path, sdxl: Path) -> dict:
    """An epoch's prompts, on rows with tags and captions sized like a real photo set (10-70
    tags of 1-3 words from 20,000, 1-5 caption sentences): microseconds a prompt to build
    them, to tokenize them with the tokenizer's own batch call (on every core) and with
    PromptTokenizer (one core; cold: its piece cache empty), and for the whole
    TrainData.epoch_prompts of a first epoch (piece caches cold) on one core and in prompt
    worker processes; and the bytes an epoch's prompts keep per row."""
    import random

    from transformers import CLIPTokenizer

    from curate.trainer.config import load_config
    from curate.trainer.data import TrainData, load_rows
    from curate.trainer.epoch_prompts import default_workers
    from tests.trainer_helpers import make_latent_dataset

    config = load_config(None)
    loaded = load_rows(make_latent_dataset(tmp / "prompts", rows), config)
    tokenizer = CLIPTokenizer.from_pretrained(sdxl / "tokenizer")
    rng = random.Random(0)
    words = sorted(w[:-4] for w in tokenizer.get_vocab()
                   if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 6)
    vocab = ["_".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(20_000)]
    for row in loaded:
        row.tags = rng.sample(vocab, rng.randint(10, 70))
        row.caption = " ".join(" ".join(rng.choices(vocab, k=rng.randint(5, 15))).replace("_", " ") + "."
                               for _ in range(rng.randint(1, 5)))
    data = TrainData(loaded, config, tokenizer)

    def timed(work) -> tuple:
        started = time.perf_counter()
        out = work()
        return out, round((time.perf_counter() - started) / rows * 1e6, 1)

    texts, build = timed(lambda: [data.prompts.build(r.image_id, 0, r.tags, r.caption, r.rank, r.has_watermark).text
                                  for r in loaded])
    _, own = timed(lambda: tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False))
    (_, cold), (_, warm) = timed(lambda: data.tokenize(texts)), timed(lambda: data.tokenize(texts))
    workers = max(2, default_workers())
    serial, parallel = (TrainData(loaded, load_config(None, prompt_workers=n), tokenizer) for n in (1, workers))
    prompts, epoch = timed(lambda: serial.epoch_prompts(0))  # a first epoch: piece caches cold
    _, parallel_us = timed(lambda: parallel.epoch_prompts(0))
    arrays = [prompts.order, prompts.position, prompts.chunks, prompts.tag_counts, *prompts.tokens, *prompts.starts]
    held = sum(a.nbytes for a in arrays)
    tokens = sum(len(t) for t in prompts.tokens)
    return {"rows": rows, "mean_tokens": round(tokens / rows, 1), "build_us": build,
            "tokenizer_us": own, "prompt_tokenizer_cold_us": cold, "prompt_tokenizer_warm_us": warm,
            "tokenize_speedup_warm": round(own / warm, 1), "epoch_prompts_us": epoch,
            f"epoch_prompts_{workers}_workers_us": parallel_us, "bytes_held_per_prompt": round(held / rows, 1)}


def tiny_steps(tmp: Path, sdxl: Path, steps: int, streaming: bool = False, lora: bool = False) -> dict:
    """Steps/s of the tiny SDXL on CPU, and the share of that time the loop waited for its
    batch. streaming: 4096 rows in 2048-row groups (4 MiB) past a 1 MiB cache, and one torch
    thread, so the next batch is read on the other core while the model trains. lora: rank-8
    adapters instead of every weight."""
    from curate.trainer.config import load_config
    from curate.trainer.train import Trainer
    from tests.trainer_helpers import make_latent_dataset

    name = "streaming" if streaming else "tiny"
    if streaming:
        make_latent_dataset(tmp / name, 4096, buckets=[(16, 16)], rows_per_group=2048)
    elif not (tmp / name).exists():  # one epoch for all the steps: a new epoch's prompts would be timed too
        make_latent_dataset(tmp / name, 4 * (steps + 1))
    torch.set_num_threads(1 if streaming else THREADS)
    output = tmp / f"run-{name}{'-lora' if lora else ''}"
    config = load_config(None, output=str(output), batch_size=4, precision="fp32", max_steps=steps + 1,
                         validate_every=0, checkpoint_every=10_000, validation_fraction=0.0,
                         latent_cache_mib=1 if streaming else 8192, lora_rank=8 if lora else 0)
    trainer = Trainer(tmp / name, sdxl, config)
    trainer.train_step(0)  # warm-up
    trainer.data_wait = 0.0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step(step)
    seconds = time.perf_counter() - started
    return {"tiny_sdxl_steps_per_s_cpu": round(steps / seconds, 2), "samples_per_s": round(4 * steps / seconds, 1),
            "trained_parameters": sum(p.numel() for p in trainer.params), "batch_size": 4,
            "threads": torch.get_num_threads(), "waiting_for_data_fraction": round(trainer.data_wait / seconds, 3)}


def real_size(device: str, batch: int, steps: int, lora: bool = False) -> dict:
    from diffusers import UNet2DConditionModel

    from curate.trainer.config import load_config
    from curate.trainer.lora import add_lora

    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816).to(device)
    unet.enable_gradient_checkpointing()
    if lora:  # as the trainer does it: frozen weights in bf16, rank-32 adapters in fp32
        add_lora({"unet": unet}, load_config(None, lora_rank=32), torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        x = torch.randn(batch, 4, 128, 128, device=device, generator=gen)
        hidden = torch.randn(batch, 154, 2048, device=device, generator=gen)
        cond = {"text_embeds": torch.randn(batch, 1280, device=device, generator=gen),
                "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=torch.float32)}
        t = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"sdxl_unet_bf16_batch": batch, "lora_rank": 32 if lora else None,
            "samples_per_s": round(batch * steps / seconds, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "trained_parameters": sum(p.numel() for p in unet.parameters() if p.requires_grad),
            "gradient_checkpointing": True, "device_name": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="latent rows for the data-path figure")
    parser.add_argument("--prompt-rows", type=int, default=20_000, help="rows for the epoch-prompts figures")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-size", action="store_true", help="SDXL-size UNet at batch 8 in bf16 (needs a GPU)")
    args = parser.parse_args()
    from curate.models.tiny import write_zoo

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.real_size:
            if not args.device.startswith("cuda") or not torch.cuda.is_available():
                parser.error("--real-size needs --device cuda and a GPU")
            result["real_size"] = real_size(args.device, 8, args.steps)
            torch.cuda.empty_cache()
            result["real_size_lora"] = real_size(args.device, 8, args.steps, lora=True)
        else:
            sdxl = write_zoo(tmp / "zoo", ["sdxl"])["sdxl"]
            result["data_path"] = data_path(args.rows, tmp, sdxl)
            result["epoch_prompts"] = epoch_prompts(args.prompt_rows, tmp, sdxl)
            result["tiny_cpu"] = tiny_steps(tmp, sdxl, args.steps)
            result["tiny_cpu_streaming"] = tiny_steps(tmp, sdxl, args.steps, streaming=True)
            result["tiny_cpu_lora"] = tiny_steps(tmp, sdxl, args.steps, lora=True)
            result["lora_vs_full_samples_per_s"] = round(result["tiny_cpu_lora"]["samples_per_s"]
                                                         / result["tiny_cpu"]["samples_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
