"""An epoch's prompts: every training row's prompt, built and tokenized, span by span.

A prompt takes ~0.1 ms on one core (building ~0.05, tokenizing the rest), so a 1.5M-row
epoch takes minutes. The rows are built in the epoch's own random order, in spans of
PROMPT_SPAN rows, and each span is usable as soon as it is built: the batch plan (see
TrainData.plan) takes a span at a time, so the first step waits for one span (about a
second), not for the whole epoch. With several workers, the spans go to worker processes. A
worker is a fresh `python` that imports only the prompt builder and the tokenizer, and reads
spans of row text (pickled: a tag repeated across a span's rows is sent once) on its stdin.
Not multiprocessing's fork, which copies the trainer's state (Ray's and CUDA's threads,
Ray's signal handlers: a pool forked in a Ray worker never ended), nor its spawn, which
re-imports the caller's main script.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from curate.trainer.prompts import PromptBuilder
from curate.trainer.tokens import PromptTokenizer

PROMPT_SPAN = 10_000  # rows per tokenizer call, progress update and worker task
CHUNK = 75  # content tokens per CLIP chunk; with BOS and EOS a chunk is 77 positions

# What a prompt is made of: image_id, tags, caption, rank, has_watermark
RowText = tuple[str, list[str], "str | None", "int | None", bool]
Span = tuple[np.ndarray, np.ndarray, np.ndarray]  # token ids, tokens per prompt, tags per prompt


class EpochPrompts:
    """An epoch's prompts as the content tokens (no BOS/EOS) of its rows, one array per span
    of `order` (about 200 bytes a prompt, where a Prompt object and an array per prompt took
    ~1.8 KB: GBs for a bigASP-size table). Filled a span at a time by build_epoch, on another
    thread: `wait` blocks until the spans a reader needs are in."""

    def __init__(self, order: np.ndarray, max_chunks: int, window_ends: list[int] | None = None):
        self.order = order  # row indices in the order their prompts are built
        self.window_ends = window_ends or [len(order)]  # where each window of row groups ends in `order`
        self.position = np.empty(len(order), np.int64)  # row index -> its place in `order`
        self.position[order] = np.arange(len(order))
        self.span, self.max_chunks = PROMPT_SPAN, max_chunks
        self.chunks = np.zeros(len(order), np.uint8)  # per row: 75-token chunks its prompt takes (1..max_chunks)
        self.tag_counts = np.zeros(len(order), np.int16)  # per row: tags in its prompt, -1 without tags (dry run)
        self.tokens: list[np.ndarray] = []  # per span: its prompts' tokens, one after another
        self.starts: list[np.ndarray] = []  # per span: where each prompt's tokens start, and the end
        self.built = 0  # rows of `order` whose prompts are in
        self.error: BaseException | None = None
        self.ready = threading.Condition()

    def add(self, span: Span) -> None:
        ids, counts, tags = span
        rows = self.order[self.built : self.built + len(counts)]
        self.chunks[rows] = np.clip(-(-counts // CHUNK), 1, self.max_chunks)
        self.tag_counts[rows] = tags
        with self.ready:
            self.tokens.append(ids)
            self.starts.append(np.concatenate([[0], np.cumsum(counts)]))
            self.built += len(counts)
            self.ready.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.ready:
            self.error = error
            self.ready.notify_all()

    @property
    def done(self) -> bool:
        return self.built == len(self.order) or self.error is not None

    def wait(self, rows: int | None = None, timeout: float | None = None) -> bool:
        """Whether the first `rows` of `order` (all by default) are built, waiting up to
        `timeout` seconds (for ever by default); a failed build raises its error here."""
        rows = len(self.order) if rows is None else rows
        with self.ready:
            self.ready.wait_for(lambda: self.built >= rows or self.error is not None, timeout)
        if self.error is not None:
            raise self.error
        return self.built >= rows

    def tokens_of(self, i: int) -> np.ndarray:
        span, k = divmod(int(self.position[i]), self.span)
        starts = self.starts[span]
        return self.tokens[span][starts[k] : starts[k + 1]]


def default_workers() -> int:
    """Half the cores this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def build_span(builder: PromptBuilder, tokenize: PromptTokenizer, epoch: int, rows: Iterable[RowText]) -> Span:
    texts, tag_counts = [], []
    for image_id, tags, caption, rank, has_watermark in rows:
        prompt = builder.build(image_id, epoch, tags, caption, rank, has_watermark)
        texts.append(prompt.text)
        tag_counts.append(len(prompt.tags) if prompt.source in ("tags", "both") else -1)
    ids, counts = tokenize(texts)  # long prompts are chunked, not truncated
    return ids, counts, np.array(tag_counts, np.int16)


def build_epoch(prompts: EpochPrompts, rows, epoch: int, builder: PromptBuilder, tokenize: PromptTokenizer,
                workers: int = 1, advance: Callable[[int], None] | None = None) -> EpochPrompts:
    """Fill `prompts` with the prompts of `rows` (TrainRows: rows.texts(indices) gives their
    RowTexts) for `epoch`, a span at a time in prompts.order; advance(rows) after each."""
    order, n = prompts.order, prompts.span
    spans = (rows.texts(order[k : k + n]) for k in range(0, len(order), n))
    workers = min(workers, -(-len(order) // prompts.span))
    if workers > 1 or len(order) > prompts.span:  # in worker processes: the trainer's threads keep the GIL
        setup = (builder.config, builder.seed, tokenize.backend.to_str())
        built = in_workers(workers, setup, ((epoch, span) for span in spans))
    else:
        built = (build_span(builder, tokenize, epoch, span) for span in spans)
    for span in built:
        prompts.add(span)
        if advance:
            advance(len(span[1]))
    return prompts


def in_workers(n: int, setup: tuple, tasks: Iterator[tuple[int, list[RowText]]]) -> Iterator[Span]:
    """build_span of each task in n worker processes, results in task order. Each worker has
    one task at a time, handed out in turn, so results come back in the same turn (and no
    pipe fills up while its reader waits on another)."""
    code = "from curate.trainer.epoch_prompts import serve; serve()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(n)]
    try:
        busy = []
        for proc in procs:
            send(proc, setup)
            task = next(tasks, None)
            if task is not None:
                send(proc, task)
                busy.append(proc)
        while busy:
            proc = busy.pop(0)
            result = pickle.load(proc.stdout)
            task = next(tasks, None)
            if task is not None:
                send(proc, task)
                busy.append(proc)
            yield result
    except (EOFError, BrokenPipeError):  # from `proc`, which has ended
        raise RuntimeError(f"a prompt worker stopped (exit code {proc.wait()}); its error is above") from None
    finally:
        for proc in procs:
            proc.kill()  # done or given up: nothing of theirs is wanted
            proc.wait()


def send(proc: subprocess.Popen, message) -> None:
    pickle.dump(message, proc.stdin, pickle.HIGHEST_PROTOCOL)
    proc.stdin.flush()


def serve() -> None:
    """A worker process: the setup, then (epoch, rows) tasks on stdin, a Span each on stdout."""
    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which ends its workers
    source, sink = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the results
    config, seed, tokenizer_json = pickle.load(source)
    builder, tokenize = PromptBuilder(config, seed), PromptTokenizer(Tokenizer.from_str(tokenizer_json))
    try:
        while True:
            epoch, rows = pickle.load(source)
            pickle.dump(build_span(builder, tokenize, epoch, rows), sink, pickle.HIGHEST_PROTOCOL)
            sink.flush()
    except (EOFError, BrokenPipeError):  # the trainer is done with this worker, or gone
        return
