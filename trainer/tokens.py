"""Prompt token ids, exactly as CLIP's tokenizer gives them, several times faster.

The trainer tokenizes every prompt of every epoch (1.5M for a bigASP-size table). The
tokenizers library's CLIP pre-tokenizer is a Unicode regex that costs ~0.5 µs a character,
~200 µs for a typical prompt: most of an epoch's preparation. But CLIP's tokenizer never
joins anything across a space: its normalizer composes no character with a space, its
pre-tokenizer ends a word at every space and drops it, and each word is encoded on its
own (BPE ending in </w>). So a prompt's ids are the ids of its space-separated pieces, one
after another, and a training set's prompts are made of the same pieces (tags, common
caption words) over and over: PromptTokenizer splits prompts at spaces and looks each
piece up in a cache that the tokenizer itself fills. A tokenizer that is not CLIP's
(another normalizer, pre-tokenizer or model, or added tokens) does all the work itself.
"""
from __future__ import annotations

import json

import numpy as np

CLIP_PIPELINE = {
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                               r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"},
         "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}
CLIP_SPECIALS = {"<|startoftext|>", "<|endoftext|>"}


class PromptTokenizer:
    """Content token ids (no BOS/EOS, no truncation) of prompts, for a tokenizers.Tokenizer
    (a transformers tokenizer's backend_tokenizer)."""

    max_pieces = 1_000_000  # ~250 MB: captions full of one-off pieces (file names, numbers) stop filling it

    def __init__(self, backend):
        self.backend = backend  # the Rust tokenizer: encode changes no state, so threads may share it
        self.pieces: dict[str, list[int]] | None = {} if is_clip_bpe(self.backend) else None
        self.dtype = np.uint16 if self.backend.get_vocab_size() <= 2**16 else np.int32

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All the texts' ids in one array, and how many of them each text has."""
        if self.pieces is None:  # not CLIP's pipeline: the tokenizer does all the work
            ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
            return np.array([t for x in ids for t in x], self.dtype), np.array([len(x) for x in ids], np.int64)
        flat: list[int] = []
        lengths = []
        for text in texts:
            before = len(flat)
            for piece in text.split(" "):
                known = self.pieces.get(piece)
                if known is None:
                    known = self.backend.encode(piece, add_special_tokens=False).ids
                    if len(self.pieces) < self.max_pieces:
                        self.pieces[piece] = known
                flat += known
            lengths.append(len(flat) - before)
        return np.array(flat, self.dtype), np.array(lengths, np.int64)


def is_clip_bpe(backend) -> bool:
    spec = json.loads(backend.to_str())
    model = spec["model"]
    return (all(spec[key] == value for key, value in CLIP_PIPELINE.items())
            and model["type"] == "BPE" and model["end_of_word_suffix"] == "</w>" and not model.get("dropout")
            and {t["content"] for t in spec["added_tokens"]} <= CLIP_SPECIALS)
