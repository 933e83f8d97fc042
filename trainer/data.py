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

Latents are not held in memory: a Row keeps only its metadata and where its latent lives
(part file, row group, row), and a batch reads the latent bytes when it is built, whole
row groups at a time through an LRU cache (LatentCache). Memory is then a few hundred
bytes of metadata per row plus at most `latent_cache_mib` of latents, instead of 128 KiB
per 1024x1024 SDXL latent for the whole table.
"""
from __future__ import annotations

import gc
import hashlib
import math
import re
import threading
from collections import Counter, OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from sys import intern
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from curate.latents import CONDITIONING, latent_array, latent_row_groups, read_row_group
from curate.store import Dataset, DatasetError, where_clause
from curate.trainer.config import TrainConfig
from curate.trainer.epoch_prompts import CHUNK, EpochPrompts, build_epoch, default_workers
from curate.trainer.prompts import PromptBuilder
from curate.trainer.tokens import PromptTokenizer

# Everything but the latent: what a Row keeps in memory
ROW_COLUMNS = ["image_id", "created_at", "shape", "scaling_factor", "shift_factor", "resized_height", "resized_width",
               *CONDITIONING, "flip_crop_left"]


@dataclass(slots=True)  # no per-instance __dict__: millions of rows
class Row:
    image_id: str
    shape: tuple[int, int, int]  # of the float16 [C, H, W] latent
    part: str  # where the latent lives: a latents part file, its row group and the row in that group
    row_group: int
    row: int
    scaling_factor: float
    shift_factor: float  # 0 for SD/SDXL VAEs; the UNet sees (latent - shift) * scale
    time_ids: tuple[int, int, int, int, int, int]  # original h, w; crop top, left; target h, w
    resized: tuple[int, int]
    tags: list[str]
    caption: str | None
    rank: int | None
    has_watermark: bool
    boxes: list[dict] | tuple  # NO_BOXES without
    flip_crop_left: int | None  # the mirrored crop's left in the flipped image (encode --flip), else None

    @property
    def bucket(self) -> tuple[int, ...]:
        return self.shape


def load_rows(ds: Dataset, config: TrainConfig) -> list[Row]:
    """load_rows_now with Python's cycle collector paused: it would scan the millions of lists
    and Rows being made again and again (a third of the time at 1.5M rows); they hold no cycles.
    They live as long as the run, so they are then frozen out of its reach (gc.freeze): any
    collection would walk them all (a full one took 8 s at 1.35M rows, holding the GIL)."""
    gc.disable()
    try:
        return load_rows_now(ds, config)
    finally:
        gc.freeze()
        gc.enable()


def load_rows_now(ds: Dataset, config: TrainConfig) -> list[Row]:
    """The ok latent rows (latest per image) of images chosen by rank and `where`, with their text.

    Only the small columns are read; a Row points at its latent for LatentCache to read later.
    The choice and the latest row of each image are made in Arrow, and Rows are made from whole
    columns (a dict or a Python step per row costs minutes at 1.5M).
    """
    conditions = ["has_latent"]
    if not config.keep_rank_0:
        conditions.append("(rank IS NULL OR rank > 0)")
    try:
        if config.where:
            conditions.append(where_clause(config.where))
        # from the stage tables' join kept in the cache folder: a resumed run starts in seconds, not minutes
        text = ds.query_manifest("SELECT image_id, tags, caption, rank, coalesce(has_watermark, false) AS "
                                 "has_watermark, watermark_boxes FROM manifest WHERE " + " AND ".join(conditions),
                                 cached=True)
    except DatasetError as e:
        raise ValueError(f"bad where {config.where!r}: {e}") from None
    groups = list(latent_row_groups(ds, config.latents_model, ROW_COLUMNS, positions=True))
    if groups:
        latents = pa.concat_tables(groups)
        latents = latents.append_column("write_order", pa.array(np.arange(latents.num_rows)))
        latents = latents.filter(pc.is_in(latents["image_id"], value_set=text["image_id"]))
    if not groups or not latents.num_rows:
        raise ValueError("no rows to train on: no ok latents among the chosen images "
                         "(run `curate encode`, check --where)")
    if pc.count_distinct(latents["image_id"]).as_py() < latents.num_rows:
        # An image encoded again: its latest row (write order: of two rows created at once, the later)
        latents = latents.sort_by([("image_id", "ascending"), ("created_at", "ascending"),
                                   ("write_order", "ascending")])
        ids = latents["image_id"]
        last = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)).to_numpy(zero_copy_only=False)
        latents = latents.filter(pa.array(np.append(last, True)))
    else:
        latents = latents.sort_by("image_id")
    # Each column becomes Python values once, in the text's order, then is put in the rows' order
    at = pc.index_in(latents["image_id"], value_set=text["image_id"]).to_numpy().tolist()

    def text_column(values: list) -> list:
        return list(map(values.__getitem__, at))

    c = {name: latents[name].to_pylist() for name in ["image_id", "row_group", "row", "scaling_factor",
                                                      "resized_height", "resized_width", "flip_crop_left"]}
    parts = latents["part"].combine_chunks().dictionary_encode()
    names = [intern(p) for p in parts.dictionary.to_pylist()]  # a part's name once, not once per row
    # each shape once, shared by its bucket's rows: [C, H, W] as one number, to find them fast
    dims = pc.list_flatten(latents["shape"]).to_numpy().reshape(-1, 3).astype(np.int64)
    keys, inverse = np.unique((dims[:, 0] << 42) | (dims[:, 1] << 21) | dims[:, 2], return_inverse=True)
    shapes = [(int(k >> 42), int(k >> 21 & (1 << 21) - 1), int(k & (1 << 21) - 1)) for k in keys]
    time_ids = zip(*(latents[name].to_pylist() for name in CONDITIONING))  # diffusers' order: sdxl_time_ids
    return list(map(Row, c["image_id"], map(shapes.__getitem__, inverse.ravel().tolist()),
                    [names[i] for i in parts.indices.to_pylist()], c["row_group"], c["row"], c["scaling_factor"],
                    pc.fill_null(latents["shift_factor"], 0.0).to_pylist(), time_ids,
                    zip(c["resized_height"], c["resized_width"]), text_column(tag_lists(text["tags"])),
                    text_column(text["caption"].to_pylist()), text_column(text["rank"].to_pylist()),
                    text_column(text["has_watermark"].to_pylist()), text_column(box_lists(text["watermark_boxes"])),
                    c["flip_crop_left"]))


NO_BOXES: tuple = ()  # shared by every row without watermark boxes (most of them)


def box_lists(boxes: pa.ChunkedArray) -> list:
    """Each row's watermark boxes; only rows that have some are converted to Python values."""
    out = [NO_BOXES] * len(boxes)
    some = np.flatnonzero(pc.fill_null(pc.list_value_length(boxes), 0).to_numpy(zero_copy_only=False) > 0)
    for i, value in zip(some.tolist(), boxes.take(some).to_pylist()):
        out[i] = value
    return out


def tag_lists(tags: pa.ChunkedArray, rows_at_once: int = 100_000) -> list[list[str]]:
    """Each row's tags as a list of strings, one string object per tag name: a tagger names
    ~10,000 tags, so a million rows share them instead of holding 40 copies each (3.3 KB a row,
    GBs in every training process). Read through the column's dictionary of names."""
    out: list[list[str]] = []
    for start in range(0, len(tags), rows_at_once):
        lists = tags.slice(start, rows_at_once).combine_chunks()
        encoded = pc.list_flatten(lists).dictionary_encode()
        names = np.array([intern(t) for t in encoded.dictionary.to_pylist()] + [""], dtype=object)
        values = names[encoded.indices.fill_null(len(names) - 1).to_numpy()]
        offsets = (lists.offsets.to_numpy() - lists.offsets[0].as_py()).tolist()
        values = values.tolist()  # sliced as a list: a numpy slice and its tolist() per row cost 4x
        out += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def split_rows(rows: list[Row], config: TrainConfig) -> tuple[list[Row], list[Row]]:
    """(train, validation): the lowest image_ids are held out."""
    n_val = min(config.validation_max, int(len(rows) * config.validation_fraction))
    return rows[n_val:], rows[:n_val]


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
    def __init__(self, rows: list[Row], config: TrainConfig, tokenizer, seed: int | None = None,
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
        self.batches_per_epoch = sum(n // config.batch_size for n in Counter(r.bucket for r in rows).values())

    def require_batches(self) -> None:
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds batch_size={self.config.batch_size} rows ({len(self.rows)} rows in "
                             f"{len(set(r.bucket for r in self.rows))} buckets); lower batch_size")
        unflipped = sum(r.flip_crop_left is None for r in self.rows)
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

    def windows(self, rng: np.random.Generator) -> list[list[int]]:
        """Row indices in windows of whole row groups. A table that fits the latent cache is one
        window. A larger one is cut into windows of row groups in random order, each filling at
        most half the cache: an epoch then reads each group about once, where drawing batches
        from the whole table reads about one group (up to ~32 MiB) per sample. The price is
        a shuffle within windows of tens of thousands of images (32,000 SDXL latents at
        1024x1024 with the default 8 GiB cache, from about 125 groups), not the whole table."""
        by_group: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            by_group[(row.part, row.row_group)].append(i)
        value_bytes = 2 * len(self.latents.columns)  # float16, per cached column
        nbytes = {g: value_bytes * sum(math.prod(self.rows[i].shape) for i in members)
                  for g, members in by_group.items()}
        if sum(nbytes.values()) <= self.latents.budget:
            return [list(range(len(self.rows)))]
        keys, windows, used = list(by_group), [[]], 0
        for j in rng.permutation(len(keys)):
            if windows[-1] and used + nbytes[keys[j]] > self.latents.budget / 2:
                windows.append([])
                used = 0
            windows[-1] += by_group[keys[j]]
            used += nbytes[keys[j]]
        return windows

    def fixed_batches(self) -> list[list[int]]:
        """Every row once, in batches of one bucket, in a fixed order (validation; epoch 0 prompts)."""
        by_bucket: dict[tuple, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            by_bucket[row.bucket].append(i)
        size = self.config.batch_size
        return [m[k : k + size] for _, m in sorted(by_bucket.items()) for k in range(0, len(m), size)]

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
            for i in batch:
                row = self.rows[i]
                lines.append(f"{micro}\t{row.time_ids[5]}\t{row.time_ids[4]}\t{chunks[i]}\t{row.image_id}\t"
                             f"{str(self.flipped(row, epoch)).lower()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)

    def collate(self, indices: list[int], epoch: int, tokenizers: list) -> dict:
        prompts = self.prompts_for(epoch, indices)
        rows = [self.rows[i] for i in indices]
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

    def __init__(self, prompts: EpochPrompts, rows: list[Row], size: int, rng: np.random.Generator):
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
        chunks, size, rng = self.prompts.chunks, self.size, self.rng
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in span:
            groups[(self.rows[i].bucket, int(chunks[i]))].append(i)
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

    row = max(data.rows, key=lambda r: (len(r.tags) + (50 if r.caption else 0), r.image_id))
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
