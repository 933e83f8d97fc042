"""The training loop: one process, or one of several data-parallel workers (trainer/distributed.py).

Reproducible by construction: the batch of micro-step s is a function of (seed, s) (see
data.py), and its noise and timesteps come from a generator seeded by (seed, s), drawn
for the whole global batch and sliced per worker, so N workers see exactly what one
process sees. Resuming restores weights, optimiser, LR schedule, GradScaler and EMA
from the checkpoint and carries on at its step: on CPU the loss curve equals that of a
run that never stopped, bit for bit.

Validation (every `validate_every` steps, rank 0) is plain MSE with fixed noise and
timesteps, on the held-out rows and on the first `stable_train_samples` training rows
(the "stable training loss"), so runs with different loss weightings compare.
"""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from curate.devices import choose
from curate.progress import progress_bar
from curate.store import Dataset
from curate.trainer.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_state,
    remove_debris,
    save_checkpoint,
    write_pipeline,
)
from curate.trainer.config import TrainConfig, config_dict
from curate.trainer.data import TrainData, latent_cache
from curate.trainer.lora import load_lora_ema, write_lora
from curate.trainer.losses import loss_weights, make_noise, snr, target_for, weighted_mse
from curate.trainer.model import AUTOCAST, Models, check_latent_scaling, pipeline_tokenizer
from curate.trainer.optimizers import make_optimizer, scaled
from curate.trainer.rows import load_rows, split_rows
from curate.trainer.tokens import PromptTokenizer

# Micro-batches ahead whose latent row groups are read (LatentCache.read_ahead) while this one trains
READ_AHEAD_BATCHES = 4


def all_reduce_mean(tensors: list[torch.Tensor], world: int, bucket_bytes: int = 64 * 2**20) -> None:
    """Average tensors over the workers in place, a bucket of up to `bucket_bytes` per all_reduce
    (as DDP does): SDXL's UNet has 1,680 parameter tensors, and each collective call has a
    fixed cost (tens of microseconds on NCCL) that one call per tensor pays 1,680 times."""
    import torch.distributed as dist

    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not buckets or size + t.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.nbytes
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat /= world
        for t, averaged in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(averaged.view_as(t))


def in_background(work: Callable[[], object]) -> Future:
    """work() on a daemon thread: a run that fails meanwhile ends without waiting for it."""
    future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


class Trainer:
    def __init__(self, dataset: str | Path, base: str | Path, config: TrainConfig, resume: bool = False,
                 rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.config, self.rank, self.world = config, rank, world
        self.output = Path(config.output)
        self.device = device or choose(config.device)[0]  # the run's precision is its own setting
        checkpoint = latest_checkpoint(self.output) if resume else None
        if resume and checkpoint is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.output / 'checkpoints'}")
        torch.manual_seed(config.seed)
        tokenizer = pipeline_tokenizer(base)
        # The rows are read while the models load (a DuckDB query and a pass over the latents'
        # small columns, which release the GIL: about a minute at 1.5M images).
        loading = in_background(partial(load_rows, Dataset(dataset), config))
        self.models = Models(base, config, self.device, checkpoint)
        tokenize = PromptTokenizer(tokenizer.backend_tokenizer)  # shared by the three data sets
        rows = loading.result()
        check_latent_scaling(rows.scale, base)
        train_rows, val_rows = split_rows(rows, config)
        latents = latent_cache(config)  # one bound on latent memory for all three sets
        shared = {"latents": latents, "tokenize": tokenize}
        self.data = TrainData(train_rows, config, tokenizer, **shared)
        self.data.require_batches()
        self.data.prefetch(self.epoch_at(checkpoint_step(checkpoint) if checkpoint else 0))
        self.last_epoch = (config.max_steps * config.gradient_accumulation - 1) // self.data.batches_per_epoch
        self.val_data = TrainData(val_rows, config, tokenizer, **shared) if val_rows else None
        self.stable_data = TrainData(train_rows[: config.stable_train_samples], config, tokenizer, **shared)
        # The next micro-batch is built on a thread while this one trains (see batch_for). The
        # three data sets share the latent cache and the tokenizer: one of them at a time.
        self.batch_thread = ThreadPoolExecutor(1, thread_name_prefix="next-batch")
        self.next_batch: tuple[int, Future] | None = None
        self.data_lock = threading.Lock()
        self.data_wait = 0.0  # seconds the loop waited for a batch
        self.scheduled: set[int] = set()  # epochs whose batches went to schedule/ (write_schedule)

        te_lr = config.text_encoder_learning_rate or config.learning_rate
        self.learning_rates = {"unet": scaled(config.learning_rate, config), "text_encoder": scaled(te_lr, config)}
        groups = [{"params": [p for p in m.parameters() if p.requires_grad],
                   "lr": self.learning_rates["unet" if name == "unet" else "text_encoder"]}
                  for name, m in self.models.trained.items()]
        self.params = [p for g in groups for p in g["params"]]
        self.lr_group = list(self.models.trained).index("unet") if "unet" in self.models.trained else 0  # logged
        self.optimizer = make_optimizer(groups, config, self.device)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=config.grad_scaler_init,
                                           enabled=config.precision == "fp16")
        # EveryDream2's ema_strength_target: the share of the start the EMA keeps after the whole run
        self.ema_decay = (config.ema_strength_target ** (config.ema_update_interval / config.max_steps)
                          if config.ema_strength_target else config.ema_decay)
        self.ema_device = torch.device(config.ema_device) if config.ema_device else self.device
        self.ema = ({n: p.detach().float().to(self.ema_device, copy=True) for n, p in self.ema_params()}
                    if self.ema_decay else None)
        self.scheduler_updates = {"prediction_type": self.models.prediction_type}
        if config.zero_terminal_snr:
            self.scheduler_updates |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        self.sampler = None  # built at the first sample (it loads the VAE)
        if config.sample_prompts:  # a mistake in the file stops the run now, not hours in
            from curate.trainer.sampling import read_prompts

            read_prompts(config.sample_prompts)
        self.step = 0
        if checkpoint is not None:
            state, ema = load_state(checkpoint)
            if self.models.lora:
                ema = load_lora_ema(checkpoint, self.models.unet)
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            self.scaler.load_state_dict(state["scaler"])
            self.step = state["step"]
            if self.ema is not None and ema is not None:
                self.ema = {n: t.float().to(self.ema_device) for n, t in ema.items()}

    def ema_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the EMA averages: the UNet's trained weights (its adapters in a LoRA run)."""
        return [(n, p) for n, p in self.models.unet.named_parameters() if p.requires_grad]

    def epoch_at(self, step: int) -> int:
        """The epoch of optimizer step `step`'s first micro-batch."""
        return step * self.config.gradient_accumulation // self.data.batches_per_epoch

    def lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return 1.0
        progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- one step ----------------------------------------------------------------------
    def loss_on(self, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor, kind: str) -> torch.Tensor:
        m, c = self.models, self.config
        latents = batch["latents"].to(self.device)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = m.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.type, dtype=AUTOCAST.get(c.precision), enabled=c.precision in AUTOCAST):
            hidden, pooled = m.encode(batch["input_ids"], batch["n_chunks"])
            pred = m.predict(noisy, timesteps, hidden, pooled, batch["time_ids"])
        target = target_for(m.scheduler, latents, noise, timesteps, m.prediction_type)
        weights = loss_weights(kind, snr(m.scheduler.alphas_cumprod, timesteps), m.prediction_type, c.min_snr_gamma)
        mask = batch.get("mask")
        return weighted_mse(pred, target, weights.to(self.device), None if mask is None else mask.to(self.device))

    def micro_step(self, micro: int) -> torch.Tensor:
        """Forward and loss of this worker's share of global micro-batch `micro`."""
        c = self.config
        batch, size = self.batch_for(micro)
        torch.manual_seed(seed_for(c.seed, micro, 1))  # dropout (LoRA's) draws from the global generator
        generator = torch.Generator().manual_seed(seed_for(c.seed, micro))
        noise = make_noise((size, *batch["latents"].shape[1:]), c.offset_noise, generator,
                           c.pyramid_noise_discount)[self.rank :: self.world]
        timesteps = torch.randint(c.timestep_min, c.timestep_max, (size,), generator=generator)[self.rank :: self.world]
        return self.loss_on(batch, noise, timesteps, c.loss)

    def batch_for(self, micro: int) -> tuple[dict, int]:
        """This worker's share of micro-batch `micro`, and the global batch's size. Reading its
        latents (row groups from disk once the table outgrows the cache) would leave the GPU
        idle; so the next micro-batch is built on a thread while this one trains (and the next
        epoch's prompts on another, see build_batch), and the loop waits only when that is slower."""
        pending = self.next_batch
        future = pending[1] if pending and pending[0] == micro else self.batch_thread.submit(self.build_batch, micro)
        more = micro + 1 < self.config.max_steps * self.config.gradient_accumulation
        self.next_batch = (micro + 1, self.batch_thread.submit(self.build_batch, micro + 1)) if more else None
        waited = time.perf_counter()
        batch = future.result()
        self.data_wait += time.perf_counter() - waited
        return batch

    def build_batch(self, micro: int) -> tuple[dict, int]:
        with self.data_lock:
            epoch, indices = self.data.batch_at(micro)
            if self.config.write_schedule and self.rank == 0 and epoch not in self.scheduled:
                self.data.write_schedule(self.output / "schedule" / f"epoch-{epoch:04d}.tsv", epoch)
                self.scheduled.add(epoch)
            if epoch < self.last_epoch:
                self.data.prefetch(epoch + 1)  # built on a thread of its own while this epoch trains
            self.read_ahead(micro)
            return self.data.collate(indices[self.rank :: self.world], epoch, self.models.tokenizers), len(indices)

    def read_ahead(self, micro: int) -> None:
        """Start reading the latent row groups of micro-batch `micro` and the next ones in its epoch,
        several at once: this batch's are then read in parallel, the next ones while it trains."""
        epoch = micro // self.data.batches_per_epoch
        last = min((epoch + 1) * self.data.batches_per_epoch, self.config.max_steps * self.config.gradient_accumulation)
        for ahead in range(micro, min(micro + 1 + READ_AHEAD_BATCHES, last)):
            rows = self.data.batch_at(ahead)[1][self.rank :: self.world]
            self.data.latents.read_ahead(self.data.rows.make(rows))

    def sync_gradients(self) -> None:
        """Average gradients over workers (what DDP does), once per optimizer step."""
        if self.world > 1:
            # a grad is None on every rank alike (e.g. CLIP's last layer under SDXL's penultimate states)
            all_reduce_mean([p.grad for p in self.params if p.grad is not None], self.world)

    def train_step(self, step: int) -> float:
        c = self.config
        self.models.train()
        total = 0.0
        for k in range(c.gradient_accumulation):
            loss = self.micro_step(step * c.gradient_accumulation + k)
            self.scaler.scale(loss / c.gradient_accumulation).backward()
            total += loss.item() / c.gradient_accumulation
        self.sync_gradients()
        self.scaler.unscale_(self.optimizer)
        if c.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, c.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and (step + 1) % c.ema_update_interval == 0:
            with torch.no_grad():  # one fused update for all 1,680 SDXL tensors, not a kernel launch each
                named = self.ema_params()
                torch._foreach_lerp_([self.ema[n] for n, _ in named],
                                     [p.detach().float().to(self.ema_device) for _, p in named], 1 - self.ema_decay)
        if self.world > 1:
            import torch.distributed as dist

            mean = torch.tensor([total])
            dist.all_reduce(mean)
            total = mean.item() / self.world
        return total

    # ---- validation and checkpoints ------------------------------------------------------
    @torch.no_grad()
    def fixed_loss(self, data: TrainData, salt: int) -> float:
        """Plain MSE with noise and timesteps fixed per batch: comparable across steps and runs."""
        self.models.train(False)
        total, count = 0.0, 0
        for j, indices in enumerate(data.fixed_batches()):
            with self.data_lock:
                batch = data.collate(indices, 0, self.models.tokenizers)
            generator = torch.Generator().manual_seed(seed_for(self.config.seed, salt, j))
            noise = make_noise(tuple(batch["latents"].shape), 0.0, generator)
            timesteps = torch.randint(self.config.timestep_min, self.config.timestep_max, (len(indices),),
                                      generator=generator)
            total += self.loss_on(batch, noise, timesteps, "mse").item() * len(indices)
            count += len(indices)
        return total / max(count, 1)

    def validate(self) -> dict:
        metrics = {"stable_train_loss": self.fixed_loss(self.stable_data, salt=1)}
        if self.val_data is not None:
            metrics["val_loss"] = self.fixed_loss(self.val_data, salt=2)
        return metrics

    def save(self) -> Path:
        m, c = self.models, self.config
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(),
                 "scaler": self.scaler.state_dict(), "config": config_dict(c)}
        def write(folder: Path) -> None:
            if m.lora:
                write_lora(folder, m, c, self.ema, self.scheduler_updates)
            else:
                write_pipeline(folder, m, self.ema, self.scheduler_updates)

        return save_checkpoint(self.output, self.step, write, state, c.keep_checkpoints)

    def sample(self, writer) -> Path:
        """The sample grid of this step: samples/step-N.png, and in TensorBoard."""
        from curate.trainer.sampling import Sampler, save_png

        if self.sampler is None:
            self.sampler = Sampler.for_training(self.models, self.scheduler_updates, self.config, self.device)
        self.models.train(False)  # no dropout (LoRA's) in what people look at
        ema = self.ema if self.config.sample_weights != "trained" else None
        grid = self.sampler.grid(f"step {self.step}", self.models.unet, ema,
                                 trained=self.ema is None or self.config.sample_weights != "ema")
        path = save_png(grid, self.output / "samples" / f"step-{self.step:08d}.png")
        writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")
        return path

    # ---- the loop -------------------------------------------------------------------------
    def run(self, show_progress: bool = True) -> dict:
        c, lead = self.config, self.rank == 0
        start, started = self.step, time.perf_counter()
        log, writer, first, loss, metrics, saved, grid = None, None, None, float("nan"), {}, None, None
        if lead:
            self.output.mkdir(parents=True, exist_ok=True)
            remove_debris(self.output)
            log = self.open_log(start)
            settings = {"learning_rate": self.learning_rates["unet"]}  # as used: scale_lr's, the EMA's decay
            if any(name != "unet" for name in self.models.trained):
                settings["text_encoder_learning_rate"] = self.learning_rates["text_encoder"]
            if self.ema is not None:
                settings["ema_decay"] = self.ema_decay
            log.write(json.dumps({"step": start, **settings}) + "\n")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=start + 1 if start else None)
        try:
            with progress_bar("train", c.max_steps - start, enabled=show_progress and lead) as advance:
                for step in range(start, c.max_steps):
                    loss = self.train_step(step)
                    self.step = step + 1
                    first = loss if first is None else first
                    if lead:
                        lr = self.lr_schedule.get_last_lr()[self.lr_group]
                        log.write(json.dumps({"step": self.step, "loss": loss, "lr": lr}) + "\n")
                        log.flush()
                        if self.step % c.log_every == 0 or self.step == c.max_steps:
                            writer.add_scalar("train/loss", loss, self.step)
                            writer.add_scalar("train/lr", lr, self.step)
                            writer.add_scalar("train/grad_scale",
                                              self.scaler.get_scale() if self.scaler.is_enabled() else 1.0, self.step)
                        if c.validate_every and (self.step % c.validate_every == 0 or self.step == c.max_steps):
                            metrics = self.validate()
                            for key, value in metrics.items():
                                writer.add_scalar(f"validation/{key}", value, self.step)
                            log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                        if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                            saved = self.save()
                        if c.sample_prompts and (self.step == c.max_steps
                                                 or c.sample_every and self.step % c.sample_every == 0):
                            grid = self.sample(writer)
                    advance(1)
        finally:
            if lead:
                log.close()
                writer.close()
        samples = (self.step - start) * c.batch_size * c.gradient_accumulation
        seconds = time.perf_counter() - started
        summary = {"steps": f"{start} -> {self.step}", "samples": samples,
                "samples/s": round(samples / max(seconds, 1e-9), 2),
                "waiting for data (s)": round(self.data_wait, 1),
                "first loss": round(first, 5) if first is not None else None, "last loss": round(loss, 5),
                **{k: round(v, 5) for k, v in metrics.items()}, "checkpoint": str(saved) if saved else None,
                "sample grid": str(grid) if grid else None, "learning rate": self.learning_rates["unet"],
                **({"ema decay": self.ema_decay} if self.ema else {}),
                "seconds": round(seconds, 1)}
        if lead:
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def open_log(self, start: int):
        """log.jsonl: one line per step; on resume, lines after the checkpoint's step are dropped."""
        path = self.output / "log.jsonl"
        kept = []
        if start and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")


def run_training(dataset: str, base: str, config: TrainConfig, resume: bool = False, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, show_progress: bool = True) -> dict:
    return Trainer(dataset, base, config, resume, rank, world, device).run(show_progress)
