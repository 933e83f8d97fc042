"""Training prompts, built fresh for every sample in every epoch (the bigASP recipe).

A prompt is a pure function of (settings, seed, epoch, image): the same run always sees
the same prompts, so training is reproducible and resumable, yet every epoch shows the
model a new variation. The rules, each switchable in `PromptConfig`:

- ucg: with probability `ucg`, the prompt is the empty string (never zeroed embeddings:
  SD1.5 and every front-end use the empty prompt as the unconditional one).
- source: tags, caption or both, drawn by `source_weights` among what the image has.
- tag_count: the number of tags ~ round(Normal(mean, sd)), at least 1, so the model sees
  everything from one tag to a 225-token prompt (mean 32, sd 19.8 from real user prompts).
- shuffle_tags: tags in random order before truncation, so truncation keeps a random subset.
- priority_tags: always kept when present, caption prompts included (`watermark`, added
  when a watermark was found).
- aliases: each tag becomes a random synonym with probability `alias_rate`.
- formatting_noise: with probability `formatting_noise`, underscores/spaces and the
  separator change, as real users type them.
- score_tags: 1 to 3 of the tags applicable to the image's rank r (`score_r`, and
  `score_k_up` for 1 <= k <= r), so no prompt needs the whole ladder.
- sentence_shuffle: caption sentences in random order (XLLsd's "shuffle by sentence").
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEPARATORS = [", ", ",", " , ", " ", ",  "]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class PromptConfig:
    ucg: float = 0.1
    tag_count: bool = True
    tag_count_mean: float = 32.0
    tag_count_sd: float = 19.8
    shuffle_tags: bool = True
    priority_tags: list[str] = field(default_factory=lambda: ["watermark"])
    aliases: str | None = None  # CSV with antecedent,consequent columns (danbooru's tag_aliases)
    alias_rate: float = 0.1
    formatting_noise: float = 0.2
    score_tags: bool = True
    sentence_shuffle: bool = True
    source_weights: dict[str, float] = field(default_factory=lambda: {"tags": 1.0, "caption": 1.0, "both": 1.0})

    def validate(self) -> None:
        for name in ("ucg", "alias_rate", "formatting_noise"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"prompts.{name} must be between 0 and 1, got {getattr(self, name)}")
        bad = set(self.source_weights) - {"tags", "caption", "both"}
        if bad or any(w < 0 for w in self.source_weights.values()) or not any(self.source_weights.values()):
            raise ValueError(f"prompts.source_weights takes non-negative weights for tags, caption and both (not all 0), got {self.source_weights}")
        if self.tag_count_sd < 0:
            raise ValueError(f"prompts.tag_count_sd must be >= 0, got {self.tag_count_sd}")
        if self.aliases and not Path(self.aliases).is_file():
            raise ValueError(f"prompts.aliases: no such file {self.aliases}")


@dataclass
class Prompt:
    text: str
    source: str  # 'ucg', 'tags', 'caption', 'both' or 'none'
    tags: list[str] = field(default_factory=list)  # the image tags used, before formatting
    drawn_count: int = 0  # the tag count drawn from the distribution (0 when not drawn)
    scores: list[str] = field(default_factory=list)


def load_aliases(path: str | Path) -> dict[str, list[str]]:
    """consequent (the canonical tag the tagger emits) -> its antecedents (synonyms people type)."""
    synonyms: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"antecedent", "consequent"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: an alias CSV needs the header antecedent,consequent (got {reader.fieldnames})")
        for row in reader:
            if row["antecedent"] and row["consequent"]:
                synonyms.setdefault(row["consequent"].strip(), []).append(row["antecedent"].strip())
    return synonyms


def applicable_scores(rank: int) -> list[str]:
    return [f"score_{rank}"] + [f"score_{k}_up" for k in range(1, rank + 1)]


def image_seed(image_id: str) -> int:
    """A stable number for an image id: its leading hex digits, or a sha256 of any other id
    (never hash(): str hashes change with every process, and prompts must not)."""
    if re.fullmatch(r"[0-9a-f]{16,}", image_id):
        return int(image_id[:16], 16)
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little") >> 1


class PromptBuilder:
    def __init__(self, config: PromptConfig, seed: int = 0):
        config.validate()
        self.config, self.seed = config, seed
        self.synonyms = load_aliases(config.aliases) if config.aliases else {}

    def rng(self, image_id: str, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, image_seed(image_id)])

    def build(self, image_id: str, epoch: int, tags: list[str] | None, caption: str | None,
              rank: int | None = None, has_watermark: bool = False) -> Prompt:
        c, rng = self.config, self.rng(image_id, epoch)
        if rng.random() < c.ucg:
            return Prompt("", "ucg")
        tags = list(tags or [])
        if has_watermark and "watermark" not in tags:
            tags.append("watermark")
        caption = (caption or "").strip()
        source = self.choose_source(rng, bool(tags), bool(caption))
        scores = self.pick_scores(rng, rank)
        parts: list[str] = []
        chosen, drawn = [], 0
        if source in ("tags", "both"):
            chosen, drawn = self.pick_tags(rng, tags)
        style = self.pick_style(rng)
        tag_text = style_join(scores + [self.mutate(rng, t) for t in chosen], style, keep=set(scores) | set(c.priority_tags))
        if source in ("caption", "both"):
            sentences = SENTENCE_END.split(caption)
            if c.sentence_shuffle and len(sentences) > 1:
                sentences = [sentences[i] for i in rng.permutation(len(sentences))]
            cap_text = " ".join(sentences)
            if source == "caption":  # priority tags ride along: the model must learn them from every prompt
                kept = scores + [t for t in tags if t in c.priority_tags]
                parts = [style_join(kept, style, keep=set(kept)), cap_text]
            else:
                parts = [cap_text, tag_text] if rng.random() < 0.5 else [tag_text, cap_text]
        else:
            parts = [tag_text]
        text = style[0].join(p for p in parts if p)
        return Prompt(text, source, chosen, drawn, scores)

    def choose_source(self, rng: np.random.Generator, has_tags: bool, has_caption: bool) -> str:
        weights = {k: w for k, w in self.config.source_weights.items()
                   if (k != "tags" or has_tags) and (k != "caption" or has_caption) and (k != "both" or (has_tags and has_caption))}
        if not any(weights.values()):  # the image lacks what the weights ask for: use what it has
            return "tags" if has_tags else "caption" if has_caption else "none"
        names = sorted(weights)
        p = np.array([weights[n] for n in names], dtype=float)
        return names[rng.choice(len(names), p=p / p.sum())]

    def pick_scores(self, rng: np.random.Generator, rank: int | None) -> list[str]:
        if not self.config.score_tags or rank is None:
            return []
        options = applicable_scores(int(rank))
        n = int(rng.integers(1, min(3, len(options)) + 1))
        return [options[i] for i in rng.choice(len(options), size=n, replace=False)]

    def pick_tags(self, rng: np.random.Generator, tags: list[str]) -> tuple[list[str], int]:
        c = self.config
        priority = [t for t in tags if t in c.priority_tags]
        rest = [t for t in tags if t not in c.priority_tags]
        if c.shuffle_tags:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        drawn = 0
        if c.tag_count:
            drawn = max(1, int(round(rng.normal(c.tag_count_mean, c.tag_count_sd))))
            rest = rest[: max(0, drawn - len(priority))]
        chosen = priority + rest
        if c.shuffle_tags:
            chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        return chosen, drawn

    def mutate(self, rng: np.random.Generator, tag: str) -> str:
        options = self.synonyms.get(tag)
        if options and tag not in self.config.priority_tags and rng.random() < self.config.alias_rate:
            return options[int(rng.integers(len(options)))]
        return tag

    def pick_style(self, rng: np.random.Generator) -> tuple[str, str]:
        """(separator, word style): ', ' and underscores-as-spaces unless noise strikes."""
        if rng.random() < self.config.formatting_noise:
            return SEPARATORS[int(rng.integers(len(SEPARATORS)))], ["spaces", "underscores"][int(rng.integers(2))]
        return ", ", "spaces"


def style_join(tags: list[str], style: tuple[str, str], keep: set[str]) -> str:
    separator, words = style
    out = []
    for t in tags:
        if t not in keep:
            t = t.replace("_", " ") if words == "spaces" else t.replace(" ", "_")
        out.append(t)
    return separator.join(out)


def fit_tag_count(lines: list[str]) -> dict:
    """Mean and sd of the number of comma-separated tags per prompt in a corpus of user prompts."""
    counts = np.array([len([t for t in line.split(",") if t.strip()]) for line in lines if line.strip()], dtype=float)
    if len(counts) < 2:
        raise ValueError("need at least two non-empty prompts (one per line) to fit a tag count")
    return {"prompts": int(len(counts)), "tag_count_mean": round(float(counts.mean()), 2),
            "tag_count_sd": round(float(counts.std(ddof=1)), 2), "median": float(np.median(counts)),
            "max": int(counts.max())}

