"""An epoch's prompts: every training row's prompt, built and tokenized, in one array.

A prompt takes ~0.1 ms on one core (building ~0.05, tokenizing the rest), so a 1.5M-row
epoch takes minutes, and the run waits for its first epoch's before the first step. Rows
are cut into spans of PROMPT_SPAN; with several workers, the spans go to worker
processes. A worker is a fresh `python` that imports only the prompt builder and the
tokenizer, and reads spans of row text (pickled: a tag repeated across a span's rows is
sent once) on its stdin. Not multiprocessing's fork, which copies the trainer's state
(Ray's and CUDA's threads, Ray's signal handlers: a pool forked in a Ray worker never
ended), nor its spawn, which re-imports the caller's main script.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from curate.trainer.prompts import PromptBuilder
from curate.trainer.tokens import PromptTokenizer

PROMPT_SPAN = 10_000  # rows per tokenizer call, progress update and worker task
CHUNK = 75  # content tokens per CLIP chunk; with BOS and EOS a chunk is 77 positions

# What a prompt is made of: image_id, tags, caption, rank, has_watermark
RowText = tuple[str, list[str], "str | None", "int | None", bool]
Span = tuple[np.ndarray, np.ndarray, np.ndarray]  # token ids, tokens per prompt, tags per prompt


@dataclass
class EpochPrompts:
    """An epoch's prompts, as the content tokens (no BOS/EOS) of every row in one array:
    row i's are tokens[starts[i]:starts[i + 1]]. About 200 bytes a prompt, where a Prompt
    object and an array per prompt took ~1.8 KB (GBs for a bigASP-size table)."""
    tokens: np.ndarray
    starts: np.ndarray
    chunks: np.ndarray  # 75-token chunks each row's prompt takes (1..max_chunks)
    tag_counts: np.ndarray  # image tags in each prompt, -1 for a prompt without tags (the dry-run report)

    def tokens_of(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]


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


def build_epoch(rows: list, epoch: int, builder: PromptBuilder, tokenize: PromptTokenizer, max_chunks: int,
                workers: int = 1, advance: Callable[[int], None] | None = None) -> EpochPrompts:
    """Every row's prompt for `epoch` (rows with image_id, tags, caption, rank, has_watermark);
    advance(rows) after each span, in row order."""
    spans = ([(r.image_id, r.tags, r.caption, r.rank, r.has_watermark) for r in rows[k : k + PROMPT_SPAN]]
             for k in range(0, len(rows), PROMPT_SPAN))
    workers = min(workers, -(-len(rows) // PROMPT_SPAN))
    if workers > 1:
        setup = (builder.config, builder.seed, tokenize.backend.to_str())
        return joined(in_workers(workers, setup, ((epoch, span) for span in spans)), max_chunks, advance)
    return joined((build_span(builder, tokenize, epoch, span) for span in spans), max_chunks, advance)


def joined(spans: Iterable[Span], max_chunks: int, advance: Callable[[int], None] | None) -> EpochPrompts:
    tokens, lengths, tag_counts = [np.zeros(0, np.uint16)], [np.zeros(0, np.int64)], [np.zeros(0, np.int16)]
    for ids, counts, tags in spans:
        tokens.append(ids)
        lengths.append(counts)
        tag_counts.append(tags)
        if advance:
            advance(len(counts))
    length = np.concatenate(lengths)
    chunks = np.clip(-(-length // CHUNK), 1, max_chunks).astype(np.uint8)
    return EpochPrompts(np.concatenate(tokens), np.concatenate([[0], np.cumsum(length)]), chunks,
                        np.concatenate(tag_counts))


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
