"""Training prompts, built fresh for every sample in every epoch (the bigASP recipe).

A prompt is a pure function of (settings, seed, epoch, image): the same run always sees
the same prompts, so training is reproducible and resumable, yet every epoch shows the
model a new variation. The rules, each switchable in `PromptConfig`:

- ucg: with probability `ucg`, the prompt is the empty string (never zeroed embeddings:
  SD1.5 and every front-end use the empty prompt as the unconditional one).
- source: tags, caption or both, drawn by `source_weights` among what the image has.
- tag_count: the number of tags ~ round(Normal(mean, sd)), at least 1, so the model sees
  everything from one tag to a 225-token prompt (mean 32, sd 19.8 from real user prompts).
  bigASP's code truncates instead and keeps at least 5 (`tag_count_rounding`, `tag_count_min`);
  v2 takes the count from the caption's length (`tag_count_from = "caption"`: its tokens / 2.5).
- shuffle_tags: tags in random order before truncation, so truncation keeps a random subset.
- keep_tags: the image's first N tags (a trigger word, a character) always come first, in
  their order and as written (no alias, no formatting noise); the rest shuffle (EveryDream2's).
- priority_tags: always kept when present, caption prompts included (`watermark`, added
  when a watermark was found).
- aliases: each tag becomes a random synonym with probability `alias_rate`.
- formatting: `noise` (ours): with probability `formatting_noise`, underscores/spaces and the
  separator change, as real users type them; `bigasp-v1` / `bigasp-v2`: as bigASP's code
  writes tags (a third of prompts with underscores, a third with spaces, a third mixed; see
  bigasp_text). Kaomoji (`^_^`, `>_<`, ...) keep their underscores in every style.
- score_tags: 1 to 3 of the tags applicable to the image's rank r (`score_r`, and
  `score_k_up` for 1 <= k <= r), so no prompt needs the whole ladder; how often 1, 2 or 3 by
  `score_tag_weights`, none at all with probability `score_tag_dropout`.
- sentence_shuffle: caption sentences in random order (XLLsd's "shuffle by sentence").
"""
from __future__ import annotations

import bisect
import csv
import itertools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

SEPARATORS = [", ", ",", " , ", " ", ",  "]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
STANDARD_NORMAL = NormalDist()
FORMATTING = ("noise", "bigasp-v1", "bigasp-v2")
# Danbooru tags whose underscore is part of the face: the WD tagger's demo app (SmilingWolf's
# wd-tagger space, from toriato's stable-diffusion-webui-wd14-tagger) leaves these as they are.
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
                     "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
# CLIP's pre-tokenizer pieces (contractions, letter runs, single digits, punctuation runs): about
# a caption's token count, which BPE raises a little for rare words.
CLIP_PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)
TOKENS_PER_TAG = 2.5  # bigASP v2's estimate ("On average a tag costs 2.5 tokens")


@dataclass
class PromptConfig:
    ucg: float = 0.1
    tag_count: bool = True
    tag_count_mean: float = 32.0
    tag_count_sd: float = 19.8
    tag_count_min: int = 1
    tag_count_rounding: str = "nearest"  # or "down" (bigASP: int() of the draw)
    tag_count_from: str = "normal"  # or "caption": the caption's tokens / 2.5 (bigASP v2), else the normal draw
    shuffle_tags: bool = True
    keep_tags: int = 0
    priority_tags: list[str] = field(default_factory=lambda: ["watermark"])
    aliases: str | None = None  # CSV with antecedent,consequent columns (danbooru's tag_aliases)
    alias_rate: float = 0.1
    formatting: str = "noise"  # noise, bigasp-v1 or bigasp-v2
    formatting_noise: float = 0.2
    score_tags: bool = True
    score_tag_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # for 1, 2 and 3 score tags
    score_tag_dropout: float = 0.0
    sentence_shuffle: bool = True
    source_weights: dict[str, float] = field(default_factory=lambda: {"tags": 1.0, "caption": 1.0, "both": 1.0})

    def validate(self) -> None:
        for name in ("ucg", "alias_rate", "formatting_noise", "score_tag_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"prompts.{name} must be between 0 and 1, got {getattr(self, name)}")
        for name, allowed in (("formatting", FORMATTING), ("tag_count_rounding", ("nearest", "down")),
                              ("tag_count_from", ("normal", "caption"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"prompts.{name} = {getattr(self, name)!r} is not one of "
                                 f"{', '.join(map(repr, allowed))}")
        if self.tag_count_min < 1:
            raise ValueError(f"prompts.tag_count_min must be at least 1, got {self.tag_count_min}")
        weights = self.score_tag_weights
        if len(weights) != 3 or any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"prompts.score_tag_weights takes three non-negative weights for 1, 2 and 3 score tags "
                             f"(not all 0), got {weights}")
        bad = set(self.source_weights) - {"tags", "caption", "both"}
        if bad or any(w < 0 for w in self.source_weights.values()) or not any(self.source_weights.values()):
            raise ValueError("prompts.source_weights takes non-negative weights for tags, caption and both "
                             f"(not all 0), got {self.source_weights}")
        if self.keep_tags < 0:
            raise ValueError(f"prompts.keep_tags must be >= 0, got {self.keep_tags}")
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


class PromptBuilder:
    """Builds prompts. Every draw is one random.Random.random() of a generator seeded with
    (seed, epoch, image id): the one draw whose stream Python keeps across versions (its
    shuffle, sample and gauss may change), and a prompt costs a quarter of what it did
    with a numpy Generator per image."""

    def __init__(self, config: PromptConfig, seed: int = 0):
        config.validate()
        self.config, self.seed = config, seed
        self.synonyms = load_aliases(config.aliases) if config.aliases else {}

    def rng(self, image_id: str, epoch: int) -> random.Random:
        return random.Random(f"{self.seed} {epoch} {image_id}")

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
        chosen, drawn = [], 0
        if source in ("tags", "both"):
            chosen, drawn = self.pick_tags(rng, tags, caption)
        # priority tags ride along with a caption: the model must learn them from every prompt
        riding = [t for t in tags if t in c.priority_tags] if source == "caption" else []
        if c.formatting == "noise":
            text = self.noisy_text(rng, source, scores, chosen, riding, caption)
        else:
            text = self.bigasp_text(rng, source, scores, chosen, riding, caption)
        return Prompt(text, source, chosen, drawn, scores)

    def noisy_text(self, rng: random.Random, source: str, scores: list[str], chosen: list[str],
                   riding: list[str], caption: str) -> str:
        """Ours: tags joined by ', ' with underscores as spaces, unless formatting noise strikes."""
        style = self.pick_style(rng)
        fixed = set(chosen[: self.config.keep_tags])  # pick_tags puts the image's first keep_tags first
        tag_text = style_join(scores + [t if t in fixed else self.mutate(rng, t) for t in chosen], style,
                              keep=set(scores) | set(self.config.priority_tags) | fixed)
        if source == "caption":
            kept = scores + riding
            parts = [style_join(kept, style, keep=set(kept)), self.caption_text(rng, caption)]
        elif source == "both":
            cap_text = self.caption_text(rng, caption)
            parts = [cap_text, tag_text] if rng.random() < 0.5 else [tag_text, cap_text]
        else:
            parts = [tag_text]
        return style[0].join(p for p in parts if p)

    def bigasp_text(self, rng: random.Random, source: str, scores: list[str], chosen: list[str],
                    riding: list[str], caption: str) -> str:
        """As bigASP's data.py writes a prompt (fpgaminer/bigasp-training, tags bigasp-v1 and
        bigasp-v2): per prompt, tags keep their underscores (a third), take spaces (a third) or
        mixed (a third: each tag spaced at 80%); ',' between tags, then a space at 80%; v1 makes
        20% of prompts separate each tag by a space instead of ',' at 20%. v1 writes score tags
        first among the tags, formatted alike; v2 puts each chosen score tag before the prompt,
        spaced at 20%, followed by ', ', ' ' or ','."""
        v1 = self.config.formatting == "bigasp-v1"
        words = below(rng, 3)  # bigASP's tag_type: 0 underscores, 1 spaces, 2 mixed
        loose = v1 and rng.random() < 0.2  # v1's delim_type 1: commas or (20%) spaces

        def join(items: list[str]) -> str:
            out = ""
            for tag in items:
                tag = spaced(tag) if words == 1 or (words == 2 and rng.random() < 0.8) else underscored(tag)
                if out:
                    out += ("," if not loose or rng.random() < 0.8 else " ") + (" " if rng.random() < 0.8 else "")
                out += tag
            return out

        first = scores if v1 else []
        if source == "caption":
            parts = [join(first + riding), self.caption_text(rng, caption)]
        else:
            fixed = set(chosen[: self.config.keep_tags])
            tag_text = join(first + [t if t in fixed else self.mutate(rng, t) for t in chosen])
            parts = [tag_text]
            if source == "both":
                cap_text = self.caption_text(rng, caption)
                parts = [cap_text, tag_text] if rng.random() < 0.5 else [tag_text, cap_text]
        text = ", ".join(p for p in parts if p)
        if not v1 and scores:
            for tag in scores:
                tag = spaced(tag) if rng.random() < 0.2 else tag
                text = tag + (", ", " ", ",")[below(rng, 3)] + text
            text = text.strip()
        return text

    def caption_text(self, rng: random.Random, caption: str) -> str:
        sentences = SENTENCE_END.split(caption)
        if self.config.sentence_shuffle:
            sentences = sample(rng, sentences)
        return " ".join(sentences)

    def choose_source(self, rng: random.Random, has_tags: bool, has_caption: bool) -> str:
        weights = {k: w for k, w in self.config.source_weights.items()
                   if (k != "tags" or has_tags) and (k != "caption" or has_caption)
                   and (k != "both" or (has_tags and has_caption))}
        if not any(weights.values()):  # the image lacks what the weights ask for: use what it has
            return "tags" if has_tags else "caption" if has_caption else "none"
        names = sorted(weights)
        cumulative = list(itertools.accumulate(weights[n] for n in names))
        return names[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]

    def pick_scores(self, rng: random.Random, rank: int | None) -> list[str]:
        """1 to 3 applicable score tags, as many as score_tag_weights draws among the counts the
        rank allows (rank 0 has one tag, rank 1 two). bigASP v2's code clips its 3:2:1 draw
        instead, so a rank-1 image gets both of its tags half the time where this gives 40%."""
        c = self.config
        if not c.score_tags or rank is None or (c.score_tag_dropout and rng.random() < c.score_tag_dropout):
            return []
        options = applicable_scores(int(rank))
        cumulative = list(itertools.accumulate(c.score_tag_weights[:min(3, len(options))]))
        return sample(rng, options, 1 + bisect.bisect_right(cumulative, rng.random() * cumulative[-1]))

    def pick_tags(self, rng: random.Random, tags: list[str], caption: str = "") -> tuple[list[str], int]:
        c = self.config
        fixed, tags = tags[: c.keep_tags], tags[c.keep_tags :]
        priority = [t for t in tags if t in c.priority_tags]
        rest = [t for t in tags if t not in c.priority_tags]
        drawn, keep = 0, len(rest)
        if c.tag_count:
            if c.tag_count_from == "caption" and caption:  # a tag prompt about as long as the caption it stands for
                count = len(CLIP_PIECES.findall(caption)) / TOKENS_PER_TAG
            else:
                count = c.tag_count_mean + c.tag_count_sd * STANDARD_NORMAL.inv_cdf(max(rng.random(), 1e-12))
            drawn = max(c.tag_count_min, round(count) if c.tag_count_rounding == "nearest" else int(count))
            keep = max(0, drawn - len(fixed) - len(priority))
        if not c.shuffle_tags:
            return fixed + priority + rest[:keep], drawn
        chosen = sample(rng, rest, keep)
        for t in priority:  # each at a random place: the order stays uniformly random
            chosen.insert(below(rng, len(chosen) + 1), t)
        return fixed + chosen, drawn

    def mutate(self, rng: random.Random, tag: str) -> str:
        options = self.synonyms.get(tag)
        if options and tag not in self.config.priority_tags and rng.random() < self.config.alias_rate:
            return options[below(rng, len(options))]
        return tag

    def pick_style(self, rng: random.Random) -> tuple[str, str]:
        """(separator, word style): ', ' and underscores-as-spaces unless noise strikes."""
        if rng.random() < self.config.formatting_noise:
            return SEPARATORS[below(rng, len(SEPARATORS))], ["spaces", "underscores"][below(rng, 2)]
        return ", ", "spaces"


def below(rng: random.Random, n: int) -> int:
    return int(rng.random() * n)


def sample(rng: random.Random, items: list, k: int | None = None) -> list:
    """k of the items (all by default) in random order: the first k steps of a Fisher-Yates shuffle."""
    items, n = list(items), len(items)
    k = n if k is None else min(k, n)
    for i in range(k):
        j = i + below(rng, n - i)
        items[i], items[j] = items[j], items[i]
    return items[:k]


def style_join(tags: list[str], style: tuple[str, str], keep: set[str]) -> str:
    separator, words = style
    return separator.join(t if t in keep else spaced(t) if words == "spaces" else underscored(t) for t in tags)


def spaced(tag: str) -> str:
    """Underscores as spaces (`long_hair` -> `long hair`), a kaomoji as it is."""
    return tag if tag in KAOMOJI else tag.replace("_", " ")


def underscored(tag: str) -> str:
    return tag if tag in KAOMOJI else tag.replace(" ", "_")


def fit_tag_count(lines: list[str]) -> dict:
    """Mean and sd of the number of comma-separated tags per prompt in a corpus of user prompts."""
    counts = np.array([len([t for t in line.split(",") if t.strip()]) for line in lines if line.strip()], dtype=float)
    if len(counts) < 2:
        raise ValueError("need at least two non-empty prompts (one per line) to fit a tag count")
    return {"prompts": int(len(counts)), "tag_count_mean": round(float(counts.mean()), 2),
            "tag_count_sd": round(float(counts.std(ddof=1)), 2), "median": float(np.median(counts)),
            "max": int(counts.max())}

