"""Every model family, declared once as data: its name, its task, its default weights and its
settings with their defaults.

The flags' help texts, `curate models list` and README's table of defaults are made from
these declarations (a test checks the README against them), and so is the `model` value
every row carries, in one format:

    FAMILY:WEIGHTS[@SETTING=VALUE,...]

WEIGHTS is a hub id as given, or a local directory as its name and a fingerprint of its
files (`vae#48627e0a`); the settings are the family's own that change its output, in
declared order. Resume keys on this value: the same model with other settings is new work.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_PROMPT = "Write a detailed description of this image in a few sentences."
JOYCAPTION_PROMPT = "Write a long descriptive caption for this image in a formal tone."
FLORENCE_PROMPT = "<MORE_DETAILED_CAPTION>"
MOONDREAM_PROMPT = "caption:normal"  # moondream's own caption() call; any other prompt goes to query()


def prompt_id(prompt: str) -> str:
    """How a prompt appears in a `model` value: 12 hex digits of its sha256."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    in_key: Callable[[Any], str] | None = str  # how it appears in the `model` value; None: not at all

    @property
    def type(self) -> type:
        return type(self.default)


@dataclass(frozen=True)
class Family:
    name: str
    task: str  # embed, rank, tag, watermark, classify, caption, encode
    weights: str  # the default weights (a hub id); "" when they must be given
    adapter: str  # "module:Class" of its adapter, imported only when the family is used
    settings: tuple[Setting, ...] = ()
    note: str = ""
    # The files its adapter reads from a hub repo, fetched alone (curate.models.common.hub_snapshot);
    # a tuple is alternatives, the first the repo has. Empty: the loader (transformers' or
    # diffusers' from_pretrained) chooses its own files.
    files: tuple = ()

    def resolve(self, **given) -> dict:
        """Every setting's value: what was given (None: not given), else its default."""
        names = {s.name for s in self.settings}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"{self.name} has no setting {unknown[0]!r}; its settings: "
                             f"{', '.join(sorted(names)) or 'none'}")
        return {s.name: s.default if given.get(s.name) is None else s.type(given[s.name]) for s in self.settings}

    def model_value(self, weights: str, settings: dict) -> str:
        return model_value(self.name, weights, {s.name: s.in_key(settings[s.name]) for s in self.settings
                                                if s.in_key is not None})

    def default(self, setting: str):
        return next(s.default for s in self.settings if s.name == setting)

    def load_adapter(self):
        import importlib

        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)


def _caption(name: str, weights: str, prompt: str, note: str,
             adapter: str = "curate.models.vlm_transformers:Transformers",
             extra: tuple[Setting, ...] = ()) -> Family:
    settings = (Setting("prompt", prompt, "the instruction sent with each image", prompt_id),
                Setting("max_new_tokens", 160, "generation limit per caption")) + extra
    return Family(name, "caption", weights, adapter, settings, note)


HTTP = (Setting("concurrency", 8, "requests in flight (a batch is one wave)", None),
        Setting("timeout", 120.0, "seconds to wait for a reply", None),
        Setting("retries", 3, "retries on 5xx/429 replies, timeouts and dropped connections", None),
        Setting("backoff", 0.5, "seconds before the first retry, doubling each time", None))

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("open_clip", "embed", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "curate.models.clip:Clip",
           note="a directory, hub id or open_clip NAME:TAG; bigASP used CLIP-B",
           files=("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))),
    Family("hf_clip", "embed", "openai/clip-vit-base-patch32", "curate.models.hf_clip:HFClip",
           note="transformers' CLIP image tower: the class token before the projection, as bigASP's scorer reads it",
           files=("config.json", "preprocessor_config.json", ("model.safetensors", "pytorch_model.bin"))),
    Family("quality", "rank", "", "curate.models.quality:QualityHead",
           note="a head from `curate quality fit` (DS/heads/quality) on its CLIP's embeddings, or bigASP's scorer.pt "
                "on hf_clip's"),
    Family("wd14", "tag", "SmilingWolf/wd-vit-tagger-v3", "curate.models.wd14:WD14",
           (Setting("general", 0.35, "keep general tags over this probability"),
            Setting("character", 0.85, "keep character tags over this probability")),
           "model.onnx or timm weights, with selected_tags.csv",
           files=("selected_tags.csv", ("model.onnx", "model.safetensors"), "config.json")),
    # The weights are on the hub as fancyfeast/joytag (the JoyTag README's download link);
    # fpgaminer/joytag is its GitHub repository, with no weights in it.
    Family("joytag", "tag", "fancyfeast/joytag", "curate.models.joytag:JoyTag",
           (Setting("threshold", 0.4, "keep tags over this probability"),),
           "448 px, one threshold for all tags", files=("config.json", "model.safetensors", "top_tags.txt")),
    Family("owlv2", "watermark", "google/owlv2-base-patch16-ensemble", "curate.models.owlv2:OWLv2",
           (Setting("query", "a watermark", "what the detector looks for"),
            Setting("threshold", 0.1, "boxes (and has_watermark) over this score")),
           "boxes kept, normalised to the image",
           files=("config.json", "preprocessor_config.json", ("model.safetensors", "pytorch_model.bin"),
                  "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.json")),
    Family("classifier", "classify", "", "curate.models.classifier:ImageClassifier",
           note="any transformers image-classification checkpoint (`hf:MODEL`): every label's probability",
           files=("config.json", "preprocessor_config.json", ("model.safetensors", "pytorch_model.bin"))),
    _caption("llava", "llava-hf/llava-1.5-7b-hf", DEFAULT_PROMPT, "LLaVA family through transformers"),
    _caption("joycaption", "fancyfeast/llama-joycaption-beta-one-hf-llava", JOYCAPTION_PROMPT,
             "LLaVA-format JoyCaption, with its system prompt"),
    _caption("hf", "", DEFAULT_PROMPT, "any transformers image-text-to-text model (SmolVLM, Qwen2.5-VL, ...)"),
    _caption("florence2", "", FLORENCE_PROMPT, "Florence-2 (native in transformers); the prompt is a task token"),
    _caption("moondream", "vikhyatk/moondream2", MOONDREAM_PROMPT,
             "remote code at a pinned revision (default 2025-01-09); needs transformers <5",
             "curate.models.vlm_transformers:Moondream"),
    _caption("vllm", "", DEFAULT_PROMPT, "vLLM's offline engine, when vllm is installed (GPU)",
             "curate.models.vlm_vllm:VLLM"),
    _caption("openai", "", DEFAULT_PROMPT, "an OpenAI-compatible server: BASE_URL#MODEL",
             "curate.models.vlm_openai:OpenAI", HTTP),
    Family("vae", "encode", "stabilityai/sdxl-vae", "curate.models.vae:Vae",
           (Setting("dtype", "auto", "fp32, fp16, bf16 or auto (fp32 on CPU; bf16 on GPU, fp16 for fp16-safe VAEs)"),),
           "a VAE or a pipeline with vae/; madebyollin/sdxl-vae-fp16-fix for fp16"),
]}


def model_value(name: str, weights: str, settings: dict) -> str:
    """`NAME:WEIGHTS[@SETTING=VALUE,...]`, the one format of the `model` column."""
    shown = {k: str(v).lower() if isinstance(v, bool) else v for k, v in settings.items()}
    return f"{name}:{weights}" + ("@" + ",".join(f"{k}={v}" for k, v in shown.items()) if shown else "")


def family(name: str, task: str | None = None) -> Family:
    """The family called `name` (of `task`, if given); the error lists the right names."""
    known = [f.name for f in FAMILIES.values() if task is None or f.task == task]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model family {name!r}{hint} Known: {', '.join(known)}")
    return FAMILIES[name]


def of_task(task: str) -> list[Family]:
    return [f for f in FAMILIES.values() if f.task == task]


def markdown_table() -> str:
    """README's table of families and their defaults."""
    lines = ["| family | task | default weights | settings (defaults) | note |", "| --- | --- | --- | --- | --- |"]
    for f in FAMILIES.values():
        settings = ", ".join(f"{s.name}={s.default!r}" for s in f.settings) or "-"
        lines.append(f"| `{f.name}` | {f.task} | {f'`{f.weights}`' if f.weights else '(give one)'} | {settings} | "
                     f"{f.note} |")
    return "\n".join(lines)
