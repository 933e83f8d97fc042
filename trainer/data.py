"""Training data: latents from the latents table, text joined from the manifest at start.

Text columns (tags, caption, rank, watermark) are read from the `manifest` view when
training starts, so re-tagging or re-captioning never needs re-encoding. Rank 0 (junk)
and rows outside `where` are left out. A small held-out set (lowest image_ids: sha256,
so a fair random sample) is kept for validation.

Every batch holds one bucket (one latent shape). Within a bucket, samples are grouped by
the number of 75-token chunks their prompt needs before batching, so the padded
lengths the model sees (75/150/225 tokens) follow the prompts' own length distribution
instead of collapsing to the longest prompt of every batch. An epoch's prompts and plan are
built a span of rows at a time (see EpochPlan), so the first step does not wait for a whole
epoch's prompts, and the plan is a pure function of (seed, epoch): a resumed run sees the
same batches. A table larger than the latent cache is shuffled within windows of row groups
that fit it (TrainData.windows).

Latents are not held in memory: the rows (TrainRows, as columns) keep only their metadata and
where each latent lives (part file, row group, row), and a batch reads the latent bytes when
it is built, whole row groups at a time through an LRU cache (LatentCache). Memory is then a
few hundred bytes of metadata per row plus at most `latent_cache_mib` of latents, instead of
128 KiB per 1024x1024 SDXL latent for the whole table.
"""
from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import Counter, OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from curate.latents import latent_array, read_row_group
from curate.trainer.config import TrainConfig
from curate.trainer.epoch_prompts import CHUNK, EpochPrompts, build_epoch, default_workers
from curate.trainer.prompts import PromptBuilder
from curate.trainer.rows import Row, TrainRows
from curate.trainer.tokens import PromptTokenizer


class LatentCache:
    """Latent bytes read on demand, whole row groups at a time; the most recently used groups
    are kept while they fit in `budget` bytes (at least one group is always kept).

    A batch of one bucket draws its rows from anywhere in its window, so it touches several
    row groups; each is read at most once per batch (even when a batch needs more groups than
    the cache holds), and a group that later batches need again is read again only if it has
    been evicted. `reads` counts reads from disk per group.

    `read_ahead` starts reading the groups of batches to come that are not held, several at
    once on threads of its own: from object storage each read waits tens of milliseconds per
    request, and parallel reads hide that wait behind the step that trains meanwhile. At most
    READ_AHEAD_GROUPS groups are in flight or waiting to be used, so memory stays bounded.
    """

    READERS = 4
    READ_AHEAD_GROUPS = 8

    def __init__(self, budget: int, columns: tuple[str, ...] = ("latent",)):
        self.budget, self.columns = budget, list(columns)
        self.nbytes = 0  # bytes of latents held now
        self.groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self.reads: Counter[tuple[str, int]] = Counter()
        self.ahead: dict[tuple[str, int], Future] = {}  # groups being read ahead, until a batch takes them
        self.readers: ThreadPoolExecutor | None = None

    def read_ahead(self, rows: list[Row]) -> None:
        for key in dict.fromkeys((r.part, r.row_group) for r in rows):
            if len(self.ahead) >= self.READ_AHEAD_GROUPS:
                return
            if key not in self.groups and key not in self.ahead:
                if self.readers is None:
                    self.readers = ThreadPoolExecutor(self.READERS, thread_name_prefix="latent-read-ahead")
                self.ahead[key] = self.readers.submit(read_row_group, key[0], key[1], self.columns)
                self.reads[key] += 1

    def group(self, key: tuple[str, int]) -> pa.Table:
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        if key in self.ahead:
            table = self.ahead.pop(key).result()
        else:
            table = read_row_group(key[0], key[1], self.columns)
            self.reads[key] += 1
        self.groups[key] = table
        self.nbytes += table.nbytes
        while len(self.groups) > 1 and self.nbytes > self.budget:
            self.nbytes -= self.groups.popitem(last=False)[1].nbytes
        return table

    def arrays(self, rows: list[Row]) -> dict[str, list[np.ndarray | None]]:
        """Per cached column (latent, and mean and logvar if asked for): the float16 [C, H, W]
        arrays of `rows`, before scaling, in order; None where a row has none."""
        groups = {key: self.group(key) for key in dict.fromkeys((r.part, r.row_group) for r in rows)}
        out = {}
        for column in self.columns:
            blobs = [groups[(r.part, r.row_group)].column(column)[r.row].as_py() for r in rows]
            out[column] = [None if b is None else latent_array(b, r.shape) for r, b in zip(rows, blobs)]
        return out


def latent_cache(config: TrainConfig) -> LatentCache:
    """The cache for a run: the moments too when latents are resampled, the mirrored crops' with flip_p."""
    columns = ("latent", "mean", "logvar") if config.resample_latents else ("latent",)
    if config.flip_p:
        columns += tuple(f"flip_{c}" for c in columns)
    return LatentCache(int(config.latent_cache_mib * 2**20), columns)


def chunked(ids: list[int], n_chunks: int, bos: int, eos: int, pad: int, positions: int = 77) -> list[int]:
    """Content tokens in n chunks of BOS + 75 tokens + EOS, padded; one chunk of all positions for long CLIP."""
    if positions > 77:
        body = ids[: positions - 2]
        return [bos, *body, eos] + [pad] * (positions - 2 - len(body))
    out = []
    for c in range(n_chunks):
        body = ids[c * CHUNK : (c + 1) * CHUNK]
        out += [bos, *body, eos] + [pad] * (CHUNK - len(body))
    return out


def image_seed(image_id: str) -> int:
    """A stable number for an image id: its leading hex digits, or a sha256 of any other id
    (never hash(): str hashes change with every process, and latent draws must not)."""
    if re.fullmatch(r"[0-9a-f]{16,}", image_id):
        return int(image_id[:16], 16)
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little") >> 1


class TrainData:
    def __init__(self, rows: TrainRows, config: TrainConfig, tokenizer, seed: int | None = None,
                 latents: LatentCache | None = None, tokenize: PromptTokenizer | None = None):
        self.rows, self.config, self.tokenizer = rows, config, tokenizer
        self.latents = latents or latent_cache(config)  # may be shared by TrainData of the same rows
        self.seed = config.seed if seed is None else seed
        self.prompts = PromptBuilder(config.prompts, seed=self.seed)
        # may be shared too: making one reads the whole tokenizer (seconds with a busy GIL)
        self.tokenize = tokenize or PromptTokenizer(tokenizer.backend_tokenizer)
        self.long_clip = tokenizer.model_max_length > 77
        self.max_chunks = 1 if self.long_clip else config.max_chunks
        self.epochs: dict[int, EpochPrompts] = {}  # epoch -> its prompts, being built (see prefetch); the two newest
        self.plans: dict[int, EpochPlan] = {}  # epoch -> its batches planned so far; the two newest
        self.batches_per_epoch = int(sum(np.bincount(rows.bucket) // config.batch_size))

    def require_batches(self) -> None:
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds batch_size={self.config.batch_size} rows ({len(self.rows)} rows in "
                             f"{len(np.unique(self.rows.bucket))} buckets); lower batch_size")
        unflipped = int((self.rows.flip_crop_left < 0).sum())
        if self.config.flip_p and unflipped:
            raise ValueError(f"flip_p needs the mirrored crops' latents, which {unflipped} of {len(self.rows)} rows "
                             "lack: encode with `curate encode --flip`")

    def flipped(self, row: Row, epoch: int) -> bool:
        """Whether `row` trains on its mirrored crop in `epoch`: a draw seeded by (seed, epoch, image)."""
        if not self.config.flip_p:
            return False
        draw = np.random.default_rng([self.seed, epoch, image_seed(row.image_id), 3]).random()
        return bool(draw < self.config.flip_p)

    def epoch_prompts(self, epoch: int, advance: Callable[[int], None] | None = None) -> EpochPrompts:
        """All of `epoch`'s prompts, waiting for their build (started now or by an earlier
        prefetch); advance(rows) follows the build's progress."""
        self.prefetch(epoch)
        prompts, shown = self.epochs[epoch], 0
        while True:
            finished = prompts.wait(timeout=0.2)
            if advance and prompts.built > shown:
                advance(prompts.built - shown)
                shown = prompts.built
            if finished:
                return prompts

    def prompts_for(self, epoch: int, indices: list[int]) -> EpochPrompts:
        """`epoch`'s prompts, once those of rows `indices` are built."""
        self.prefetch(epoch)
        prompts = self.epochs[epoch]
        prompts.wait(int(prompts.position[indices].max()) + 1)
        return prompts

    def prefetch(self, epoch: int) -> None:
        """Start building `epoch`'s prompts on a thread of their own, after the epochs already
        asked for, so that the next epoch's are built while this one trains. A daemon thread:
        a process that exits (Ctrl-C, an error) does not wait minutes for prompts nobody uses."""
        if epoch in self.epochs:
            return
        earlier, prompts = list(self.epochs.values()), self.new_prompts(epoch)

        def build() -> None:
            for other in earlier:  # one build at a time
                with other.ready:
                    other.ready.wait_for(lambda: other.done)
            try:
                self.build_prompts(epoch, into=prompts)
            except BaseException as e:
                prompts.fail(e)

        self.epochs = {e: p for e, p in self.epochs.items() if e >= epoch - 1} | {epoch: prompts}
        threading.Thread(target=build, name=f"prompts-epoch-{epoch}", daemon=True).start()

    def new_prompts(self, epoch: int) -> EpochPrompts:
        """`epoch`'s prompts, none built yet, in the epoch's order: each window of row groups (see
        windows) in turn, its rows in random order. A span of that order is a random sample of
        its window, and the plan batches a span at a time."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        windows = [np.asarray(w, np.int64) for w in self.windows(rng)]
        return EpochPrompts(np.concatenate([w[rng.permutation(len(w))] for w in windows]), self.max_chunks,
                            np.cumsum([len(w) for w in windows]).tolist())

    def build_prompts(self, epoch: int, advance: Callable[[int], None] | None = None,
                      into: EpochPrompts | None = None) -> EpochPrompts:
        return build_epoch(into or self.new_prompts(epoch), self.rows, epoch, self.prompts, self.tokenize,
                           self.config.prompt_workers or default_workers(), advance)

    def plan(self, epoch: int, batches: int | None = None) -> list[list[int]]:
        """The epoch's batches (row indices), at least its first `batches` (all by default): see
        EpochPlan. Planned as far as asked, as the prompts they need are built."""
        if epoch not in self.plans:
            self.prefetch(epoch)
            self.plans = {e: p for e, p in self.plans.items() if e >= epoch - 1} | {
                epoch: EpochPlan(self.epochs[epoch], self.rows, self.config.batch_size,
                                 np.random.default_rng([self.seed, epoch, 4]))}
        return self.plans[epoch].first(self.batches_per_epoch if batches is None else batches)

    def windows(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Row indices in windows of whole row groups. A table that fits the latent cache is one
        window. A larger one is cut into windows of row groups in random order, each filling at
        most half the cache: an epoch then reads each group about once, where drawing batches
        from the whole table reads about one group (up to ~32 MiB) per sample. The price is
        a shuffle within windows of tens of thousands of images (32,000 SDXL latents at
        1024x1024 with the default 8 GiB cache, from about 125 groups), not the whole table."""
        group, value_bytes = self.rows.group, 2 * len(self.latents.columns)  # float16, per cached column
        numel = np.array([math.prod(shape) for shape in self.rows.shapes], np.int64)[self.rows.bucket]
        if value_bytes * int(numel.sum()) <= self.latents.budget:
            return [np.arange(len(self.rows))]
        # row groups in the order the rows first name them, each with its rows (in order) and bytes
        keys, first = np.unique(group, return_index=True)
        keys = keys[np.argsort(first)]
        count = len(self.rows.groups)  # of the table: some may hold none of these rows
        members = np.split(np.argsort(group, kind="stable"), np.cumsum(np.bincount(group, minlength=count))[:-1])
        nbytes = value_bytes * np.bincount(group, weights=numel, minlength=count)
        windows, used = [[]], 0
        for j in rng.permutation(len(keys)):
            key = int(keys[j])
            if windows[-1] and used + nbytes[key] > self.latents.budget / 2:
                windows.append([])
                used = 0
            windows[-1].append(members[key])
            used += nbytes[key]
        return [np.concatenate(w) for w in windows]

    def fixed_batches(self) -> list[list[int]]:
        """Every row once, in batches of one bucket, in a fixed order (validation; epoch 0 prompts)."""
        order = np.argsort(self.rows.bucket, kind="stable")  # by shape, each bucket's rows in order
        size = self.config.batch_size
        return [m[k : k + size].tolist() for m in np.split(order, np.cumsum(np.bincount(self.rows.bucket))[:-1])
                for k in range(0, len(m), size)]

    def batch_at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, row indices) of the global micro-step `step`."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return epoch, self.plan(epoch, index + 1)[index]

    def write_schedule(self, path: Path, epoch: int) -> None:
        """EveryDream2's write_schedule: the epoch's batches, a row per sample (global micro-step,
        bucket in pixels, prompt chunks, image, whether the mirrored crop is used), as TSV."""
        chunks = self.epoch_prompts(epoch).chunks
        lines = ["micro_step\twidth\theight\tchunks\timage_id\tflipped"]
        for index, batch in enumerate(self.plan(epoch)):
            micro = epoch * self.batches_per_epoch + index
            for i, row in zip(batch, self.rows.make(batch)):
                lines.append(f"{micro}\t{row.time_ids[5]}\t{row.time_ids[4]}\t{chunks[i]}\t{row.image_id}\t"
                             f"{str(self.flipped(row, epoch)).lower()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)

    def collate(self, indices: list[int], epoch: int, tokenizers: list) -> dict:
        prompts = self.prompts_for(epoch, indices)
        rows = self.rows.make(indices)
        flips = [self.flipped(r, epoch) for r in rows]
        n_chunks = int(prompts.chunks[indices].max())
        positions = self.tokenizer.model_max_length
        latents = self.latent_samples(rows, epoch, flips)
        batch = {
            "image_ids": [r.image_id for r in rows],
            "latents": torch.from_numpy(np.stack([(latent.astype(np.float32) - r.shift_factor) * r.scaling_factor
                                                  for r, latent in zip(rows, latents)])),
            "time_ids": torch.tensor([flipped_time_ids(r) if f else r.time_ids for r, f in zip(rows, flips)],
                                     dtype=torch.float32),
            "input_ids": [torch.tensor([chunked(prompts.tokens_of(i).tolist(), n_chunks, tok.bos_token_id,
                                                tok.eos_token_id, tok.pad_token_id, positions) for i in indices])
                          for tok in tokenizers],
            "n_chunks": n_chunks,
        }
        if self.config.mask_watermarks:
            batch["mask"] = torch.stack([watermark_mask(r, f) for r, f in zip(rows, flips)])
        return batch

    def latent_samples(self, rows: list[Row], epoch: int, flips: list[bool] | None = None) -> list[np.ndarray]:
        """The latents to train on (the mirrored crop's where `flips` says): with `resample_latents`
        and the moments stored (encode --keep-distribution), a fresh draw from the VAE's
        distribution for each image and epoch, seeded by (seed, epoch, image); otherwise the
        sample stored at encoding."""
        stored = self.latents.arrays(rows)
        flips = flips or [False] * len(rows)
        arrays = {c: [stored[f"flip_{c}" if f else c][k] for k, f in enumerate(flips)]
                  for c in ("latent", "mean", "logvar") if c in stored}
        if not self.config.resample_latents:
            return arrays["latent"]
        out = []
        for r, latent, mean, logvar in zip(rows, arrays["latent"], arrays["mean"], arrays["logvar"]):
            if mean is None or logvar is None:
                out.append(latent)
                continue
            noise = (np.random.default_rng([self.seed, epoch, image_seed(r.image_id), 2])
                     .standard_normal(r.shape, np.float32))
            out.append(mean.astype(np.float32) + np.exp(0.5 * logvar.astype(np.float32)) * noise)
        return out


class EpochPlan:
    """An epoch's batches, planned a span of its prompts' order at a time (so the first batch
    waits for one span of prompts, not for the whole epoch), a window at most (so that the
    span's batches read only its window's row groups). Within a span, rows are grouped by
    bucket and by the 75-token chunks their prompt needs, so that the padded lengths the model
    sees follow the prompts' own length distribution; each group is cut into batches, the
    rows left over join the bucket's rows left over from earlier spans, and those make more
    batches; what is still short of a batch goes on to the next span, and the span's batches
    come in random order. Every bucket gives floor(rows / batch_size) batches an epoch."""

    def __init__(self, prompts: EpochPrompts, rows: TrainRows, size: int, rng: np.random.Generator):
        self.prompts, self.rows, self.size, self.rng = prompts, rows, size, rng
        self.batches: list[list[int]] = []
        self.carried: dict[tuple, list[int]] = {}
        self.planned = 0  # rows of prompts.order planned

    def first(self, n: int) -> list[list[int]]:
        total = len(self.prompts.order)
        while len(self.batches) < n and self.planned < total:
            # a span of prompts, or less at the end of a window: a span's batches mix its rows
            window_end = next(e for e in self.prompts.window_ends if e > self.planned)
            end = min(self.planned + self.prompts.span, window_end)
            self.prompts.wait(end)
            self.add_span(self.prompts.order[self.planned : end].tolist())
            self.planned = end
        return self.batches

    def add_span(self, span: list[int]) -> None:
        chunks, buckets, size, rng = self.prompts.chunks, self.rows.bucket, self.size, self.rng
        groups: dict[tuple, list[int]] = defaultdict(list)  # (bucket, chunks): bucket numbers go as their shapes
        for i, bucket, n in zip(span, buckets[span].tolist(), chunks[span].tolist()):
            groups[(bucket, n)].append(i)
        batches, leftovers = [], defaultdict(list, self.carried)
        for (bucket, _), members in sorted(groups.items()):
            full = len(members) // size * size
            batches += [members[k : k + size] for k in range(0, full, size)]
            leftovers[bucket] += members[full:]
        self.carried = {}
        for bucket, members in sorted(leftovers.items()):
            members = [members[j] for j in rng.permutation(len(members))]
            full = len(members) // size * size
            batches += [members[k : k + size] for k in range(0, full, size)]
            self.carried[bucket] = members[full:]
        self.batches += [batches[j] for j in rng.permutation(len(batches))]


def flipped_time_ids(row: Row) -> tuple[int, ...]:
    """The mirrored crop's conditioning: the same sizes and top, its own left."""
    orig_h, orig_w, top, _, target_h, target_w = row.time_ids
    return (orig_h, orig_w, top, row.flip_crop_left, target_h, target_w)


def watermark_mask(row: Row, flipped: bool = False) -> torch.Tensor:
    """1 where the loss counts, 0 over watermark boxes, in latent coordinates [1, h, w] (of the
    mirrored crop when `flipped`: the boxes mirror too)."""
    _, h, w = row.shape
    mask = torch.ones(1, h, w)
    orig_h, orig_w, top, left, target_h, target_w = flipped_time_ids(row) if flipped else row.time_ids
    res_h, res_w = row.resized
    for box in row.boxes:
        # normalised original -> resized pixels -> crop pixels -> latent cells (covering the box)
        box_x0, box_x1 = (1 - box["x1"], 1 - box["x0"]) if flipped else (box["x0"], box["x1"])
        y0 = (box["y0"] * res_h - top) * h / target_h
        y1 = (box["y1"] * res_h - top) * h / target_h
        x0 = (box_x0 * res_w - left) * w / target_w
        x1 = (box_x1 * res_w - left) * w / target_w
        r0, r1 = max(0, math.floor(y0)), min(h, math.ceil(y1))
        c0, c1 = max(0, math.floor(x0)), min(w, math.ceil(x1))
        if r1 > r0 and c1 > c0:
            mask[:, r0:r1, c0:c1] = 0
    return mask


def dry_run_report(data: TrainData, epochs: int = 1, advance: Callable[[int], None] | None = None) -> dict:
    """Padded prompt lengths per batch and tag counts over `epochs` epochs, and one example per
    rule; advance(rows) follows the prompts' build (minutes at 1.5M rows an epoch)."""
    lengths, tag_counts = Counter(), Counter()
    for epoch in range(epochs):
        prompts = data.epoch_prompts(epoch, advance)
        for batch in data.plan(epoch):
            n = int(prompts.chunks[batch].max())
            lengths[data.tokenizer.model_max_length if data.long_clip else n * CHUNK] += 1
        tag_counts.update(min(n // 10 * 10, 100) for n in prompts.tag_counts.tolist() if n >= 0)
    return {"batches": sum(lengths.values()), "padded_lengths": dict(sorted(lengths.items())),
            "tag_counts": {f"{k}-{k + 9}" if k < 100 else "100+": v for k, v in sorted(tag_counts.items())},
            "examples": rule_examples(data)}


def rule_examples(data: TrainData) -> dict[str, str]:
    """For the richest row: the prompt with every rule off, then with each rule alone."""
    import dataclasses

    text = data.rows.text
    tags = pc.fill_null(pc.list_value_length(text["tags"]), 0).to_numpy(zero_copy_only=False)
    captioned = pc.fill_null(pc.greater(pc.utf8_length(text["caption"]), 0), False).to_numpy(zero_copy_only=False)
    richness = tags + 50 * captioned
    row = data.rows[int(np.flatnonzero(richness == richness.max())[-1])]  # the last: the highest image_id
    off = dataclasses.replace(data.config.prompts, ucg=0.0, tag_count=False, shuffle_tags=False, alias_rate=0.0,
                              formatting_noise=0.0, score_tags=False, sentence_shuffle=False,
                              source_weights={"tags": 1.0, "caption": 0.0, "both": 0.0})
    rules = {"all off": {}, "shuffle_tags": {"shuffle_tags": True},
             "tag_count": {"tag_count": True, "shuffle_tags": True},
             "aliases": {"alias_rate": 1.0}, "formatting_noise": {"formatting_noise": 1.0},
             "score_tags": {"score_tags": True},
             "caption": {"source_weights": {"tags": 0.0, "caption": 1.0, "both": 0.0}},
             "both": {"source_weights": {"tags": 0.0, "caption": 0.0, "both": 1.0}},
             "sentence_shuffle": {"sentence_shuffle": True,
                                  "source_weights": {"tags": 0.0, "caption": 1.0, "both": 0.0}},
             "ucg": {"ucg": 1.0}, "all on": None}
    examples = {}
    for name, change in rules.items():
        config = data.config.prompts if change is None else dataclasses.replace(off, **change)
        p = PromptBuilder(config, seed=data.seed).build(row.image_id, 0, row.tags, row.caption, row.rank,
                                                        row.has_watermark)
        examples[name] = p.text
    return examples
